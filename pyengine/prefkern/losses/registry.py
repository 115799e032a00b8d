"""One entry point for every loss: :func:`preference_loss`."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

from .c3po import c3po_loss
from .cpo import cpo_loss
from .dpo import DPO_LOSS_TYPES, dpo_loss
from .ipo import ipo_loss, slic_hf_loss
from .kto import kto_loss
from .orpo import orpo_loss
from .outputs import PreferenceBatch, PreferenceLossOutput
from .salt import salt_loss
from .simpo import simpo_loss

__all__ = ["preference_loss", "available_loss_types", "loss_entry", "LossEntry", "LOSS_REGISTRY"]

class LossEntry(NamedTuple):
    """A catalog entry: the family function, the keyword arguments the name fixes, and how the batch loss splits.

    ``per_pair``: the batch loss is a mean over pairs (or, ``unpaired``, over examples) of per-pair terms plus a
    token-mean NLL with a normaliser known up front, so a chunk of whole pairs gives its exact share of the value
    and the gradient (the fused engine's eager mode). ``unpaired``: rows are single examples (KTO), not
    ``[chosen; rejected]`` pairs.
    """

    fn: Callable[..., PreferenceLossOutput]
    fixed: Dict[str, Any]
    per_pair: bool = True
    unpaired: bool = False


# aot / aot_unpaired sort across the batch and bco_pair keeps a running mean; salt is token-level and c3po adds
# terms on other prompts: none of them splits into per-pair shares
_NOT_PER_PAIR = ("aot", "aot_unpaired", "aot_pair", "bco_pair")

#: name -> LossEntry
LOSS_REGISTRY: Dict[str, LossEntry] = {}
for _t in DPO_LOSS_TYPES + ("aot_pair",):
    LOSS_REGISTRY[_t] = LossEntry(dpo_loss, {"loss_type": _t}, per_pair=_t not in _NOT_PER_PAIR)
LOSS_REGISTRY.update({
    "dpo": LossEntry(dpo_loss, {"loss_type": "sigmoid"}),
    "simpo": LossEntry(simpo_loss, {"loss_type": "sigmoid"}),
    "simpo_hinge": LossEntry(simpo_loss, {"loss_type": "hinge"}),
    "orpo": LossEntry(orpo_loss, {}),
    "cpo": LossEntry(cpo_loss, {"loss_type": "sigmoid"}),
    "cpo_hinge": LossEntry(cpo_loss, {"loss_type": "hinge"}),
    "cpo_ipo": LossEntry(cpo_loss, {"loss_type": "ipo"}),
    "cpo_simpo": LossEntry(cpo_loss, {"loss_type": "simpo"}),
    "alphapo": LossEntry(cpo_loss, {"loss_type": "alphapo"}),
    "kto": LossEntry(kto_loss, {"loss_type": "kto"}, unpaired=True),
    "apo_zero_unpaired": LossEntry(kto_loss, {"loss_type": "apo_zero_unpaired"}, unpaired=True),
    "ipo_paper": LossEntry(ipo_loss, {}),
    "slic_hf": LossEntry(slic_hf_loss, {}),
    "salt": LossEntry(salt_loss, {}, per_pair=False),
    "c3po": LossEntry(c3po_loss, {}, per_pair=False),
})
_BATCH_FIELDS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                 "chosen_lengths", "rejected_lengths", "chosen_nll")


def loss_entry(loss_type: Union[str, Sequence[str]], kwargs: Optional[Dict[str, Any]] = None) -> LossEntry:
    """The catalog entry of ``loss_type`` (a name, ``"rpo"`` or a list of DPO types), with the fixed arguments
    it implies. ``kwargs``: the caller's keyword arguments, from which ``rpo_alpha`` is taken (popped)."""
    if isinstance(loss_type, (list, tuple)):
        types = list(loss_type)
        per_pair = not any(t in _NOT_PER_PAIR for t in types)
        return LossEntry(dpo_loss, {"loss_type": types}, per_pair=per_pair)
    if not isinstance(loss_type, str):
        raise TypeError(f"loss_type must be a string or a list of strings, got {type(loss_type).__name__}")
    if loss_type == "rpo":
        alpha = 1.0 if kwargs is None else kwargs.pop("rpo_alpha", 1.0)
        return LossEntry(dpo_loss, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, alpha]})
    if loss_type in LOSS_REGISTRY:
        return LOSS_REGISTRY[loss_type]
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {available_loss_types()}")


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
    kwargs = dict(kwargs)
    fn, fixed = loss_entry(loss_type, kwargs)[:2]
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
