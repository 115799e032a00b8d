"""Drop-in replacements for other libraries' preference-loss APIs, built on prefkern's kernels.

- :mod:`prefkern.compat.liger`: Liger-Kernel 0.8.5's fused linear preference losses
  (``LigerFusedLinearDPOLoss``, ``...ORPOLoss``, ``...CPOLoss``, ``...SimPOLoss``, ``...KTOLoss``):
  same constructor and forward signatures, same output tuples, so switching is a one-line import change.

Nothing here imports the library it mimics.
"""

from .liger import (
    LigerFusedLinearCPOLoss,
    LigerFusedLinearDPOLoss,
    LigerFusedLinearKTOLoss,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOLoss,
)

__all__ = [
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearSimPOLoss",
    "LigerFusedLinearKTOLoss",
]
