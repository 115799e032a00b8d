"""prefkern: fused kernels for preference optimisation.

Public API (each op takes ``backend="auto"|"native"|"triton"|"cuda"|"torch"``):

- ``logprobs(logits, labels)``: token log-probs from logits without a second ``[N, V]`` tensor.
- ``info()``: which backends can run here and why not (also ``python -m prefkern info``).
- ``reference``: the plain-PyTorch truth every kernel is tested against.
- ``ensemble_reduce``, ``EnsembleRewardHead``, ``RewardEnsemble``: ensemble reward scoring (mean / WCO / UWO).
"""

from ._version import __version__
from . import reference
from .dispatch import info
from .ops.logprobs import logprobs

__all__ = ["__version__", "info", "logprobs", "reference"]
from .ensemble import EnsembleRewardHead, EnsembleScores, RewardEnsemble, bootstrap_weights, bradley_terry_loss, calibration_stats, ensemble_reduce  # noqa: E402
__all__ += ["ensemble_reduce", "EnsembleRewardHead", "RewardEnsemble", "EnsembleScores", "calibration_stats", "bradley_terry_loss", "bootstrap_weights"]
