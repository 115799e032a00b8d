"""The fused-loss engine (DESIGN.md sections 4-5), in three layers that call only downwards:

- :mod:`.engine`: :func:`~.engine.fused_loss` decides eager or stream once per call (backend and memory budget
  resolved once) and returns the loss with its gradients;
- :mod:`.objective`: the loss bound to one batch (a catalog entry and its options), evaluated on the whole batch
  or on a chunk of pairs;
- :mod:`.eager`: the eager pass (chunks of whole pairs through the lm-head once, gradients inside forward).

The GEMMs and row kernels underneath are :mod:`prefkern.ops.lm_head_gemm` and :mod:`prefkern.ops.logprobs`.
"""

from .engine import EngineOptions, FusedResult, default_memory_budget, fused_loss, token_logps_no_grad
from .objective import CatalogObjective, CatalogUnpairedObjective, BatchObjective

__all__ = ["EngineOptions", "FusedResult", "default_memory_budget", "fused_loss", "token_logps_no_grad",
           "BatchObjective", "CatalogObjective", "CatalogUnpairedObjective"]
