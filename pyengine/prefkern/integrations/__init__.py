"""Adapters that drive other libraries' models with prefkern's kernels (kept out of the core).

- :mod:`prefkern.integrations.hf`: Hugging Face ``transformers`` models: ``BestOfN`` (generate n
  candidates, score, select) and ``RewardEnsemble`` (K separate reward models reduced on the device).

Nothing here is imported by the core modules; ``prefkern`` re-exports these names for compatibility.
"""

from .hf import BestOfN, BestOfNResult, RewardEnsemble, mean_over_members

__all__ = ["BestOfN", "BestOfNResult", "RewardEnsemble", "mean_over_members"]
