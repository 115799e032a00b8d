"""prefkern: fused kernels for preference optimisation.

Public API (each op takes ``backend="auto"|"native"|"triton"|"cuda"|"torch"``):

- ``logprobs(logits, labels)``: token log-probs from logits without a second ``[N, V]`` tensor.
- ``info()``: which backends can run here and why not (also ``python -m prefkern info``).
- ``reference``: the plain-PyTorch truth every kernel is tested against.
"""

from ._version import __version__
from . import reference
from .dispatch import info
from .ops.logprobs import logprobs

__all__ = ["__version__", "info", "logprobs", "reference"]
from .best_of_n import BestOfN, BestOfNResult, Selection, best_of_n, sample  # sampling + best-of-n (issue #6)
__all__ += ["sample", "best_of_n", "Selection", "BestOfN", "BestOfNResult"]  # sampling + best-of-n (issue #6)
