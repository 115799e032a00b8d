"""prefkern: fused kernels for preference optimisation.

Public API (each op takes ``backend="auto"|"native"|"triton"|"cuda"|"torch"``):

- ``logprobs(logits, labels)``: token log-probs from logits without a second ``[N, V]`` tensor.
- ``info()``: which backends can run here and why not (also ``python -m prefkern info``).
- ``linear_logprobs(hidden, weight, labels)``: the same from hidden states and the lm-head, logits never whole.
- ``FusedLinearPreferenceLoss``: any loss of the catalog on hidden states (stream and eager modes).
- ``preference_loss`` and the loss catalog (``prefkern.losses``): every objective of LOSSES.md.
- ``reference``: the plain-PyTorch truth every kernel is tested against.
- ``ensemble_reduce``, ``EnsembleRewardHead``, ``RewardEnsemble``: ensemble reward scoring (mean / WCO / UWO).
- ``sample``, ``best_of_n``, ``BestOfN``: seeded token sampling, per-prompt selection, end-to-end best-of-n.
"""

from ._version import __version__
from . import reference
from .dispatch import info
from .ops.logprobs import logprobs
from .ops.linear_logprobs import linear_logprobs
from .losses import *  # noqa: F401,F403
from .losses import __all__ as _losses_all
from .fused_loss import FusedLinearPreferenceLoss
from .distributed import VocabParallel
from .ensemble import (
    EnsembleRewardHead, EnsembleScores, bootstrap_weights, bradley_terry_loss, calibration_stats, ensemble_head,
    ensemble_reduce,
)
from .best_of_n import Selection, best_of_n, sample

__all__ = ["__version__", "info", "logprobs", "linear_logprobs", "FusedLinearPreferenceLoss", "VocabParallel",
           "reference"]
__all__ += list(_losses_all)
__all__ += ["ensemble_reduce", "ensemble_head", "EnsembleRewardHead", "RewardEnsemble", "EnsembleScores",
            "calibration_stats", "bradley_terry_loss", "bootstrap_weights"]
__all__ += ["sample", "best_of_n", "Selection", "BestOfN", "BestOfNResult"]

from .integrations import BestOfN, BestOfNResult, RewardEnsemble  # noqa: E402  last: integrations use the core
