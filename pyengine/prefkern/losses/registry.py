"""One entry point for every loss: :func:`preference_loss`."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .c3po import c3po_loss
from .cpo import cpo_loss
from .dpo import DPO_LOSS_TYPES, dpo_loss
from .ipo import ipo_loss, slic_hf_loss
from .kto import kto_loss
from .orpo import orpo_loss
from .outputs import PreferenceBatch, PreferenceLossOutput
from .salt import salt_loss
from .simpo import simpo_loss

__all__ = ["preference_loss", "available_loss_types", "LOSS_REGISTRY"]

#: name -> (function, fixed keyword arguments)
LOSS_REGISTRY: Dict[str, Tuple[Callable[..., PreferenceLossOutput], Dict[str, Any]]] = {}
for _t in DPO_LOSS_TYPES + ("aot_pair",):
    LOSS_REGISTRY[_t] = (dpo_loss, {"loss_type": _t})
LOSS_REGISTRY.update({
    "dpo": (dpo_loss, {"loss_type": "sigmoid"}),
    "simpo": (simpo_loss, {"loss_type": "sigmoid"}),
    "simpo_hinge": (simpo_loss, {"loss_type": "hinge"}),
    "orpo": (orpo_loss, {}),
    "cpo": (cpo_loss, {"loss_type": "sigmoid"}),
    "cpo_hinge": (cpo_loss, {"loss_type": "hinge"}),
    "cpo_ipo": (cpo_loss, {"loss_type": "ipo"}),
    "cpo_simpo": (cpo_loss, {"loss_type": "simpo"}),
    "alphapo": (cpo_loss, {"loss_type": "alphapo"}),
    "kto": (kto_loss, {"loss_type": "kto"}),
    "apo_zero_unpaired": (kto_loss, {"loss_type": "apo_zero_unpaired"}),
    "ipo_paper": (ipo_loss, {}),
    "slic_hf": (slic_hf_loss, {}),
    "salt": (salt_loss, {}),
    "c3po": (c3po_loss, {}),
})
_BATCH_FIELDS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                 "chosen_lengths", "rejected_lengths", "chosen_nll")


def available_loss_types() -> List[str]:
    """Every name accepted by :func:`preference_loss` (plus ``"rpo"`` and lists of DPO types)."""
    return sorted(list(LOSS_REGISTRY) + ["rpo"])


def preference_loss(
    loss_type: Union[str, Sequence[str]],
    /,
    *args: Any,
    batch: Optional[PreferenceBatch] = None,
    **kwargs: Any,
) -> PreferenceLossOutput:
    """Compute any loss of the catalog by name.

    Parameters
    ----------
    loss_type : str or list of str (positional-only)
        * a TRL DPO ``loss_type`` (``"sigmoid"``, ``"hinge"``, ``"ipo"``, ``"exo_pair"``,
          ``"nca_pair"``, ``"robust"``, ``"bco_pair"``, ``"sppo_hard"``, ``"aot"``,
          ``"aot_unpaired"``/``"aot_pair"``, ``"apo_zero"``, ``"apo_down"``,
          ``"discopop"``, ``"sft"``, ``"sigmoid_norm"``, ``"cdpo"``; ``"dpo"`` =
          ``"sigmoid"``) or a list of them (multi-loss) -> :func:`dpo_loss`;
        * ``"rpo"`` -> ``dpo_loss(loss_type=["sigmoid", "sft"], loss_weights=[1, rpo_alpha])``
          (``rpo_alpha`` keyword, default 1.0);
        * ``"simpo"``, ``"simpo_hinge"`` -> :func:`simpo_loss`; ``"orpo"`` -> :func:`orpo_loss`;
        * ``"cpo"``, ``"cpo_hinge"``, ``"cpo_ipo"``, ``"cpo_simpo"``, ``"alphapo"`` -> :func:`cpo_loss`;
        * ``"kto"``, ``"apo_zero_unpaired"`` -> :func:`kto_loss`;
        * ``"ipo_paper"`` -> :func:`ipo_loss`; ``"slic_hf"`` -> :func:`slic_hf_loss`;
        * ``"salt"`` -> :func:`salt_loss`; ``"c3po"`` -> :func:`c3po_loss`.
    *args, **kwargs
        Forwarded to the family function (see its docstring for shapes and options).
    batch : PreferenceBatch, optional
        Per-sequence inputs (e.g. from :func:`preference_batch`); its fields fill the
        family function's parameters of the same name that are not given explicitly.

    Returns
    -------
    PreferenceLossOutput

    Raises
    ------
    ValueError
        Unknown ``loss_type`` (the message lists the valid names).
    """
    if isinstance(loss_type, (list, tuple)):
        fn, fixed = dpo_loss, {"loss_type": list(loss_type)}
    elif not isinstance(loss_type, str):
        raise TypeError(f"loss_type must be a string or a list of strings, got {type(loss_type).__name__}")
    elif loss_type == "rpo":
        alpha = kwargs.pop("rpo_alpha", 1.0)
        fn, fixed = dpo_loss, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, alpha]}
    elif loss_type in LOSS_REGISTRY:
        fn, fixed = LOSS_REGISTRY[loss_type]
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {available_loss_types()}")
    clash = [k for k in fixed if k in kwargs]
    if clash:
        raise TypeError(f"preference_loss({loss_type!r}) sets {clash} itself; call the family function to change it")
    call_kwargs = dict(kwargs)
    call_kwargs.update(fixed)
    if batch is not None:
        if not isinstance(batch, PreferenceBatch):
            raise TypeError(f"batch must be a PreferenceBatch, got {type(batch).__name__}")
        params = list(inspect.signature(fn).parameters)
        positional = params[: len(args)]
        for name in _BATCH_FIELDS:
            if name in params and name not in positional and name not in call_kwargs:
                value = getattr(batch, name)
                if value is not None or name.startswith("ref_"):
                    call_kwargs[name] = value
    return fn(*args, **call_kwargs)
