"""TRL <= 1.13 on prefkern: ``DPOConfig(use_liger_kernel=True)`` runs prefkern's Liger-compatible DPO loss.

TRL 1.0 - 1.13 route ``use_liger_kernel=True`` to a fused linear DPO class that it builds in
``trl.trainer.dpo_trainer``: ``LigerFusedLinearDPOLoss`` (imported from ``liger_kernel.chunked_loss`` when
``is_liger_kernel_available()``, TRL 1.0 - 1.12) or ``FusedLinearDPOLoss`` (TRL's own copy in ``trl.losses``, TRL
1.13). :func:`patch_trl` points both names at :class:`prefkern.compat.liger.LigerFusedLinearDPOLoss`, makes the
trainer's availability check pass without liger-kernel installed, and after each ``DPOTrainer`` is built rebuilds
its loss with the options TRL left out (``label_smoothing`` and ``discopop_tau`` before 1.13). Options the Liger
route cannot honour (``ld_alpha``, WPO's ``use_weighting``) raise at construction instead of training silently on
another loss. TRL >= 1.14 has no Liger loss class: use :mod:`prefkern.integrations.trl` there.

    from prefkern.compat.liger.trl_patch import patch_trl
    patch_trl()
    trainer = DPOTrainer(..., args=DPOConfig(..., use_liger_kernel=True))
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Dict, Optional

from .dpo import LigerFusedLinearDPOLoss

__all__ = ["patch_trl", "unpatch_trl", "trl_patched"]

#: the names TRL's dpo_trainer module builds its fused DPO loss from (TRL 1.0 - 1.12, TRL 1.13)
LOSS_CLASS_NAMES = ("LigerFusedLinearDPOLoss", "FusedLinearDPOLoss")
#: the trainer attributes that hold the loss (TRL 1.0 - 1.5, TRL 1.10 - 1.13)
LOSS_ATTRIBUTES = ("liger_loss_fn", "liger_loss")
_MISSING = object()
_LOCK = threading.Lock()
_SAVED: Dict[str, Any] = {}


def _liger_available(*args: Any, **kwargs: Any) -> bool:
    return True


def _version(text: str) -> tuple:
    out = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _check_options(args: Any) -> None:
    """What the Liger route of TRL <= 1.13 never passes to its loss: refused instead of silently dropped."""
    if getattr(args, "ld_alpha", None) is not None:
        raise NotImplementedError("ld_alpha is not applied by TRL <= 1.13's Liger route (it sums the log-probs): "
                                  "set use_liger_kernel=False, or upgrade to TRL >= 1.14 and use "
                                  "prefkern.integrations.trl")
    if getattr(args, "use_weighting", False):
        raise NotImplementedError("WPO (use_weighting) is not applied by TRL <= 1.13's Liger route: set "
                                  "use_liger_kernel=False, or upgrade to TRL >= 1.14 and use prefkern.integrations.trl")


def _rebuilt_loss(trainer: Any) -> LigerFusedLinearDPOLoss:
    args = trainer.args
    loss_types = args.loss_type if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
    return LigerFusedLinearDPOLoss(beta=args.beta, loss_type=loss_types[0],
                                   label_smoothing=getattr(args, "label_smoothing", 0.0),
                                   discopop_tau=getattr(args, "discopop_tau", 0.05))


def _wrap_init(init: Callable) -> Callable:
    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None and getattr(config, "use_liger_kernel", False):
            _check_options(config)
        init(self, *args, **kwargs)
        if getattr(self, "use_liger_kernel", False):
            _check_options(self.args)
            for name in LOSS_ATTRIBUTES:
                if hasattr(self, name):
                    setattr(self, name, _rebuilt_loss(self))
            if not _SAVED.get("liger_layers", True):
                # the trainer routes its loss on its own flag; the Trainer's flag only applies Liger's layer kernels
                self.args.use_liger_kernel = False

    __init__._prefkern_wrapped = True  # type: ignore[attr-defined]
    return __init__


def patch_trl(liger_layers: Optional[bool] = None) -> None:
    """Make TRL (1.0 - 1.13) ``DPOTrainer``'s ``use_liger_kernel=True`` route run prefkern's fused DPO loss.

    Idempotent; :func:`unpatch_trl` restores TRL. liger-kernel need not be installed.

    Parameters
    ----------
    liger_layers : ``use_liger_kernel=True`` also makes ``transformers.Trainer`` swap the model's layers (RMSNorm,
        SwiGLU, RoPE) for Liger's Triton kernels, which needs liger-kernel and a Triton device. None (default): keep
        that when liger-kernel is installed, skip it otherwise; False: skip it (the loss still runs on prefkern);
        True: keep it.

    Raises
    ------
    ImportError
        TRL is not installed.
    RuntimeError
        TRL >= 1.14, whose trainers have no Liger loss class: use :func:`prefkern.integrations.trl.use_prefkern_lm_head`
        (TRL's own losses on prefkern's log-probs) or :class:`prefkern.integrations.trl.PrefkernDPOTrainer`.
    """
    import trl

    if _version(trl.__version__) >= (1, 14):
        raise RuntimeError(
            f"TRL {trl.__version__} (>= 1.14) builds no Liger DPO loss (its fused lm-head computes the log-probs): "
            "use prefkern.integrations.trl.use_prefkern_lm_head() around DPOTrainer, or "
            "prefkern.integrations.trl.PrefkernDPOTrainer")
    import trl.trainer.dpo_trainer as module

    with _LOCK:
        if _SAVED:
            return
        if liger_layers is None:
            import importlib.util

            liger_layers = importlib.util.find_spec("liger_kernel") is not None
        _SAVED["liger_layers"] = bool(liger_layers)
        for name in LOSS_CLASS_NAMES + ("is_liger_kernel_available",):
            _SAVED[name] = module.__dict__.get(name, _MISSING)
        for name in LOSS_CLASS_NAMES:
            setattr(module, name, LigerFusedLinearDPOLoss)
        module.is_liger_kernel_available = _liger_available
        trainer = module.DPOTrainer
        _SAVED["__init__"] = trainer.__dict__["__init__"]
        trainer.__init__ = _wrap_init(trainer.__dict__["__init__"])


def unpatch_trl() -> None:
    """Undo :func:`patch_trl` (no-op when TRL is not patched)."""
    import trl.trainer.dpo_trainer as module

    with _LOCK:
        if not _SAVED:
            return
        module.DPOTrainer.__init__ = _SAVED.pop("__init__")
        _SAVED.pop("liger_layers", None)
        for name, value in _SAVED.items():
            if value is _MISSING:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, value)
        _SAVED.clear()


def trl_patched() -> bool:
    """Whether :func:`patch_trl` is in effect."""
    return bool(_SAVED)
