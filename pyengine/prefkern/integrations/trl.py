"""Hugging Face TRL on prefkern: ``DPOTrainer`` with prefkern's lm-head kernels, in one line.

Supported TRL versions: the seam (1) for TRL >= 1.14, :class:`PrefkernDPOTrainer` (2) for TRL >= 1.15 (tested on
1.14.0, 1.15 by source, 1.16.0); TRL 1.0 - 1.13: :func:`prefkern.compat.liger.trl_patch.patch_trl`.

1. **The log-prob seam** (:func:`use_prefkern_lm_head`). TRL >= 1.15 computes every per-token log-prob of its
   trainers through one chunked function (``trl.trainer.utils._ChunkedLogProbFunction``, called by the forward that
   ``add_fused_lm_head`` installs, reached with ``model(..., fused_lm_head=True)``). The seam swaps it for
   :func:`chunked_logprobs`, built on :func:`prefkern.linear_logprobs`, with the same arguments and outputs (token
   log-probs, entropy, ``log sum_v p_v^2``, mean logits, top-1 agreement). TRL's losses, options and metrics run
   unchanged::

       from prefkern.integrations.trl import use_prefkern_lm_head

       with use_prefkern_lm_head():
           trainer = DPOTrainer(model=model, ref_model=ref, args=dpo_config, ...)  # precomputes here
           trainer.train()

   (``enable_prefkern_lm_head()`` switches it on for the rest of the process.) TRL 1.14 has an older two-output
   form of the function, imported by its trainer modules and used by their chunked paths
   (``DPOConfig(use_liger_kernel=True)``); the seam serves it too, but 1.14's default DPO path materialises the
   logits and never calls it.

2. **PrefkernDPOTrainer**: a ``DPOTrainer`` whose policy loss runs through
   :class:`prefkern.FusedLinearPreferenceLoss` (eager: 3 GEMM units, the gradient taken inside forward, logits never
   whole), built from the ``DPOConfig`` by :func:`from_trl`; reference log-probs (precomputed or not) go through the
   seam. An option it cannot honour raises at construction::

       from prefkern.integrations.trl import PrefkernDPOTrainer
       trainer = PrefkernDPOTrainer(model=model, ref_model=ref, args=dpo_config, train_dataset=ds,
                                    processing_class=tokenizer)

TRL is imported lazily: importing this module does not import ``trl``; the prefkern core never imports it.

The head's temperature, logit scale and soft-cap go to :func:`prefkern.linear_logprobs` /
:class:`prefkern.FusedLinearPreferenceLoss` as they are; TRL's row quantities (entropy, ``log sum p^2``, mean
logits, top-1) come from the same pass over each chunk (``return_stats=True``).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import types
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..fused_loss import FusedLinearPreferenceLoss
from ..ops.linear_logprobs import linear_logprobs
from ..ops.lm_head_gemm import LogitTransform

__all__ = [
    "use_prefkern_lm_head", "enable_prefkern_lm_head", "disable_prefkern_lm_head", "prefkern_lm_head_enabled",
    "chunked_logprobs", "PrefkernChunkedLogProbFunction", "PrefkernChunkedLogProbEntropyFunction", "LogitTransform",
    "model_logit_transform",
    "trl_loss_options", "from_trl", "PrefkernDPOTrainer", "trl_version", "SEAM_MIN_VERSION",  # noqa: F822 (lazy)
]

#: first TRL release whose trainers compute log-probs through ``trl.trainer.utils._ChunkedLogProbFunction``
SEAM_MIN_VERSION = "1.14"
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_STATS_OUTPUTS = OUTPUTS[1:]


# ---- TRL discovery ------------------------------------------------------------------------------------------------

def trl_version() -> Tuple[int, ...]:
    """The installed TRL's version as a tuple of ints (``(1, 16, 0)``); ImportError when TRL is not installed."""
    import trl

    return _version_tuple(trl.__version__)


def _version_tuple(text: str) -> Tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:
            break
    return tuple(parts)


def _trl_utils() -> types.ModuleType:
    """``trl.trainer.utils`` with the seam, or a RuntimeError that names the route for older TRL."""
    try:
        import trl.trainer.utils as utils
    except ImportError as e:  # pragma: no cover - exercised only without TRL
        raise ImportError("prefkern.integrations.trl needs TRL (pip install 'trl>=1.14')") from e
    if getattr(utils, "_ChunkedLogProbFunction", None) is None:
        import trl

        raise RuntimeError(
            f"TRL {trl.__version__} has no chunked log-prob function (trl.trainer.utils._ChunkedLogProbFunction, "
            f"TRL >= {SEAM_MIN_VERSION}; 1.15+ needs Triton importable): for TRL <= 1.13 call "
            "prefkern.compat.liger.trl_patch.patch_trl() and set DPOConfig(use_liger_kernel=True)")
    return utils


def _fused_head_trl() -> bool:
    """TRL >= 1.15: ``add_fused_lm_head`` and the five-output function (``outputs=``); TRL 1.14: two outputs
    (log-probs, entropy), called by the trainers' chunked paths (``use_liger_kernel=True``)."""
    utils = _trl_utils()
    fn = utils._ChunkedLogProbFunction
    original = _SAVED.get("fn", fn)
    return hasattr(utils, "add_fused_lm_head") and "outputs" in _parameters(original.forward)


# ---- core capabilities (issue #14 item 4) -------------------------------------------------------------------------

def _parameters(fn: Callable) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


# ---- the logit transform of a head -------------------------------------------------------------------------------

def model_logit_transform(model: Any, temperature: float = 1.0) -> LogitTransform:
    """The logit scale and soft cap a ``transformers`` causal LM applies after its lm-head, from its config.

    Reads the text config's ``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere),
    ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1) and ``logits_scaling`` (Granite, MiniCPM3 divide by
    it; HyperCLOVA X multiplies), as TRL's fused head does.

    Parameters
    ----------
    model : a ``transformers.PreTrainedModel`` (or anything with a ``config``).
    temperature : the sampling temperature the trainer divides the logits by.

    Returns
    -------
    LogitTransform
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None)
        if scale is not None:
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scaling = float(text.logits_scaling)
        scale = scaling if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / scaling
    return LogitTransform(float(temperature), 1.0 if scale is None else float(scale),
                          None if cap is None else float(cap))


# ---- the seam's function -----------------------------------------------------------------------------------------

def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """TRL's rule: the autocast dtype under autocast, else the hidden states' dtype."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def _zero3_partitioned(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a DeepSpeed ZeRO-3 parameter (partitioned outside its gather context)."""
    return hasattr(weight, "ds_id")


class _EntropyWithoutGradient(torch.autograd.Function):
    """The entropy as an output that refuses a gradient: prefkern's row pass gives it without one, so a loss that
    differentiates it (GRPO's entropy bonus) fails loudly instead of training on a silently missing term."""

    @staticmethod
    def forward(ctx, entropy: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        return entropy.clone()

    @staticmethod
    def backward(ctx, grad: Optional[torch.Tensor]):
        if grad is not None and bool(grad.ne(0).any()):
            raise RuntimeError("the prefkern lm-head seam gives the entropy without a gradient (used for logging by "
                               "DPO, KTO and SFT); a loss that differentiates the entropy needs TRL's own chunked "
                               "function: leave use_prefkern_lm_head() off for this trainer")
        return None, None


class _GatheredLogProbs(torch.autograd.Function):
    """Token log-probs of a ZeRO-3 head: forward without a graph, backward recomputes inside TRL's gather context
    (the head is partitioned again between forward and backward). One more matmul unit than the plain path."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, fn):
        ctx.fn = fn
        ctx.save_for_backward(hidden, weight, bias, targets)
        with torch.no_grad():
            return fn(hidden, weight, bias, targets)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets = ctx.saved_tensors
        inputs = [t for t in (hidden, weight, bias) if t is not None]
        with _trl_utils().maybe_gather_lm_head_ctx(weight, bias), torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, ctx.needs_input_grad)]
            hl, wl = leaves[0], leaves[1]
            bl = leaves[2] if bias is not None else None
            logp = ctx.fn(hl, wl, bl, targets)
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(logp, wanted, grad)) if wanted else iter(())
        out = [next(grads) if leaf.requires_grad else None for leaf in leaves]
        if bias is None:
            out.append(None)
        return out[0], out[1], out[2], None, None


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                 transform: LogitTransform, backend: str, return_stats: bool):
    """:func:`prefkern.linear_logprobs` with the head's transform (and its row statistics when asked)."""
    return linear_logprobs(hidden, weight, targets, bias, backend=backend, temperature=transform.temperature,
                           logit_scale=transform.scale, logit_softcap=transform.softcap, return_stats=return_stats)


def _stats_dict(stats: Any, vocab: int) -> Dict[str, torch.Tensor]:
    """TRL's names for :class:`prefkern.ops.linear_logprobs.TokenStats`."""
    return {"entropy": stats.entropy, "log_sum_sq_probs": stats.log_sum_p2, "mean_logits": stats.logit_sum / vocab,
            "is_top1": stats.top1 > 0.5}


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 32768,
    final_logit_softcapping: Optional[float] = None,
    logit_scale: float = 1.0,
    outputs: Sequence[str] = OUTPUTS,
    *,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:
    """TRL's chunked log-prob function (``trl.trainer.utils._ChunkedLogProbFunction.apply``) on prefkern.

    Same arguments and outputs as TRL's; the logits ``[N, V]`` never exist.

    Parameters
    ----------
    hidden : [N, H] hidden states of the scored positions (float32 / bfloat16 / float16).
    weight : [V, H] lm-head; bias : [V] or None. Computed in the autocast dtype under autocast, else in
        ``hidden``'s dtype (TRL's rule; a head of another dtype is cast).
    targets : [N] int64 labels in ``[0, V)``.
    temperature : the logits are divided by it.
    chunk_size : TRL's vocabulary tile width; unused (prefkern chunks by tokens within a memory budget).
    final_logit_softcapping : ``c`` of a soft-capped head (``c tanh(z / c)``), or None.
    logit_scale : factor on the logits before the cap.
    outputs : which of ``"entropy"``, ``"log_sum_sq_probs"``, ``"mean_logits"``, ``"is_top1"`` to compute
        (``"log_probs"`` always is).
    backend : prefkern's row-kernel backend.

    Returns
    -------
    (log_probs [N] fp32, differentiable; entropy [N] fp32 or None (refuses a gradient); log_sum_sq_probs [N] fp32
    or None; mean_logits [N] fp32 or None; is_top1 [N] bool or None), as TRL's function.
    """
    del chunk_size
    transform = LogitTransform(float(temperature), float(logit_scale),
                               None if final_logit_softcapping is None else float(final_logit_softcapping))
    dtype = _compute_dtype(hidden)
    hidden = hidden.to(dtype)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    targets = targets.to(torch.int64)
    wanted = [name for name in _STATS_OUTPUTS if name in outputs]

    def logps_only(h, w, b, y):
        return _token_logps(h, w, b, y, transform, backend, False)

    stats: Dict[str, torch.Tensor] = {}
    if _zero3_partitioned(weight):
        logp = _GatheredLogProbs.apply(hidden, weight, bias, targets, logps_only)
        if wanted:  # the head is gathered here (TRL's context); the statistics need no gradient
            with torch.no_grad():
                _, token_stats = _token_logps(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                              targets, transform, backend, True)
            stats = _stats_dict(token_stats, weight.shape[0])
    elif wanted:
        logp, token_stats = _token_logps(hidden, weight, bias, targets, transform, backend, True)
        stats = _stats_dict(token_stats, weight.shape[0])
    else:
        logp = logps_only(hidden, weight, bias, targets)
    result: List[Optional[torch.Tensor]] = [logp]
    for name in _STATS_OUTPUTS:
        if name not in wanted:
            result.append(None)
        elif name == "entropy":
            result.append(_EntropyWithoutGradient.apply(stats["entropy"].float(), hidden))
        elif name == "is_top1":
            result.append(stats["is_top1"].to(torch.bool))
        else:
            result.append(stats[name].float())
    return tuple(result)  # type: ignore[return-value]


class PrefkernChunkedLogProbFunction:
    """Stands in for ``trl.trainer.utils._ChunkedLogProbFunction`` (TRL >= 1.15): ``apply`` is
    :func:`chunked_logprobs`."""

    backend = "auto"

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OUTPUTS):
        return chunked_logprobs(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                                logit_scale, outputs, backend=cls.backend)


class PrefkernChunkedLogProbEntropyFunction:
    """Stands in for TRL 1.14's ``_ChunkedLogProbFunction``: ``apply`` returns ``(log_probs, entropy)``."""

    backend = "auto"

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0):
        out = chunked_logprobs(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                               logit_scale, ("log_probs", "entropy"), backend=cls.backend)
        return out[0], out[1]


# ---- switching the seam -----------------------------------------------------------------------------------------

_LOCK = threading.RLock()
_DEPTH = [0]
_SAVED: Dict[str, Any] = {}
_REPLACEMENTS = (PrefkernChunkedLogProbFunction, PrefkernChunkedLogProbEntropyFunction)


def _always_compact(device: torch.device) -> bool:
    # TRL 1.16 scores only the labelled positions on Triton devices; elsewhere it pushes every position through the
    # head (fixed shapes for compilers like Neuron's). prefkern's kernels take any row count: only scored rows go in.
    return True


def _holders(*held: Any) -> List[types.ModuleType]:
    """Loaded ``trl`` modules that hold one of ``held`` under the function's name (TRL 1.14's trainers import it by
    name; a trainer module first imported inside the context picks up the replacement)."""
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "trl" or name.startswith("trl.")) and
            any(vars(m).get("_ChunkedLogProbFunction") is h for h in held)]


def enable_prefkern_lm_head() -> None:
    """Route TRL's chunked log-prob function to prefkern until :func:`disable_prefkern_lm_head` (nestable).

    TRL >= 1.15: every trainer built on ``add_fused_lm_head`` (``DPOTrainer``, ``KTOTrainer``, ``SFTTrainer``,
    ``GRPOTrainer``...). TRL 1.14: the trainers' chunked paths (``DPOConfig(use_liger_kernel=True)``; its default DPO
    path materialises the logits and is not reached).

    Raises
    ------
    RuntimeError
        TRL < 1.14 (no such function: use :func:`prefkern.compat.liger.trl_patch.patch_trl`).
    """
    utils = _trl_utils()
    with _LOCK:
        if _DEPTH[0] == 0:
            original = utils._ChunkedLogProbFunction
            replacement = (PrefkernChunkedLogProbFunction if "outputs" in _parameters(original.forward)
                           else PrefkernChunkedLogProbEntropyFunction)
            _SAVED["fn"] = original
            for module in _holders(original):
                module._ChunkedLogProbFunction = replacement
            if hasattr(utils, "_use_triton"):
                _SAVED["compact"] = utils._use_triton
                utils._use_triton = _always_compact
        _DEPTH[0] += 1


def disable_prefkern_lm_head() -> None:
    """Undo one :func:`enable_prefkern_lm_head`; TRL's own function is back after the last one."""
    utils = _trl_utils()
    with _LOCK:
        if _DEPTH[0] == 0:
            return
        _DEPTH[0] -= 1
        if _DEPTH[0] == 0:
            original = _SAVED.pop("fn")
            for module in _holders(*_REPLACEMENTS):
                module._ChunkedLogProbFunction = original
            if "compact" in _SAVED:
                utils._use_triton = _SAVED.pop("compact")


def prefkern_lm_head_enabled() -> bool:
    """Whether TRL's chunked log-prob function is prefkern's now."""
    if "trl.trainer.utils" not in sys.modules:
        return False
    return getattr(sys.modules["trl.trainer.utils"], "_ChunkedLogProbFunction", None) in _REPLACEMENTS


@contextlib.contextmanager
def use_prefkern_lm_head() -> Iterator[None]:
    """Context manager: TRL (>= 1.14) computes its log-probs, entropies and logits metrics with prefkern inside.

    Every trainer that computes its log-probs through TRL's chunked function is affected (see
    :func:`enable_prefkern_lm_head`); its losses, options and logged metrics are TRL's own. One exception: a loss that
    differentiates the entropy (GRPO's entropy bonus) raises, as prefkern gives the entropy without a gradient.

    Examples
    --------
    >>> with use_prefkern_lm_head():  # doctest: +SKIP
    ...     trainer = DPOTrainer(model=model, ref_model=ref, args=config, train_dataset=ds)
    ...     trainer.train()
    """
    enable_prefkern_lm_head()
    try:
        yield
    finally:
        disable_prefkern_lm_head()


# ---- DPOConfig -> prefkern ----------------------------------------------------------------------------------------

_PER_PAIR_FREE = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "sppo_hard", "apo_zero", "apo_down",
                  "discopop", "sft", "sigmoid_norm", "bco_pair", "aot", "aot_unpaired")


def _loss_types(args: Any) -> List[str]:
    types_ = args.loss_type
    return [types_] if isinstance(types_, str) else list(types_)


def trl_loss_options(args: Any) -> Dict[str, Any]:
    """Keyword arguments of :class:`prefkern.FusedLinearPreferenceLoss` equivalent to a TRL ``DPOConfig``.

    Covers every ``loss_type`` (and lists with ``loss_weights``: MPO, RPO as ``["sigmoid", "sft"]``), ``beta``,
    ``label_smoothing``, ``f_divergence_type`` / ``f_alpha_divergence_coef``, ``discopop_tau`` and ``ld_alpha``.
    WPO (``use_weighting``) needs per-batch weights: :class:`PrefkernDPOTrainer` adds them each step.

    Parameters
    ----------
    args : a ``trl.DPOConfig`` (or any object with its attributes).

    Returns
    -------
    dict

    Raises
    ------
    NotImplementedError
        An option prefkern cannot honour here: ``padding_free`` (packed rows are not ``[chosen; rejected]``),
        a list of loss types on a prefkern without weighted lists.
    ValueError
        An unknown loss type, or legacy options of TRL 0.x (``rpo_alpha``, ``reference_free``) that TRL >= 1.0
        spells as loss types.
    """
    types_ = _loss_types(args)
    unknown = [t for t in types_ if t not in _PER_PAIR_FREE]
    if unknown:
        raise ValueError(f"loss_type {unknown} is not a TRL DPOTrainer loss prefkern routes (known: "
                         f"{sorted(_PER_PAIR_FREE)})")
    if getattr(args, "padding_free", False):
        raise NotImplementedError("padding_free packs the batch into one row; the fused preference loss needs "
                                  "[chosen; rejected] rows: set padding_free=False")
    if getattr(args, "rpo_alpha", None) is not None:
        raise ValueError("rpo_alpha is TRL 0.x; write loss_type=['sigmoid', 'sft'], loss_weights=[1, rpo_alpha]")
    if getattr(args, "reference_free", False):
        raise ValueError("reference_free is TRL 0.x; prefkern's TRL route follows TRL >= 1.0")
    weights = getattr(args, "loss_weights", None)
    kwargs: Dict[str, Any] = {
        "beta": float(args.beta),
        "ignore_index": -100,
        "empty_completions": "keep",
        "ld_alpha": getattr(args, "ld_alpha", None),
        "f_divergence_type": getattr(args, "f_divergence_type", "reverse_kl"),
        "discopop_tau": float(getattr(args, "discopop_tau", 0.05)),
        "trl_version": "0.29",
    }
    if hasattr(args, "f_alpha_divergence_coef"):
        kwargs["f_alpha_divergence_coef"] = float(args.f_alpha_divergence_coef)
    if any(t in ("robust", "exo_pair", "aot", "aot_unpaired") for t in types_):
        kwargs["label_smoothing"] = float(getattr(args, "label_smoothing", 0.0))
    if len(types_) == 1 and not weights:
        kwargs["loss_type"] = types_[0]
    else:
        kwargs["loss_type"] = types_
        kwargs["loss_weights"] = [float(w) for w in (weights or [1.0] * len(types_))]
    return kwargs


def from_trl(args: Any, *, mode: str = "auto", backend: str = "auto", memory_budget: Optional[int] = None,
             **extra: Any) -> FusedLinearPreferenceLoss:
    """:class:`prefkern.FusedLinearPreferenceLoss` for a TRL ``DPOConfig`` (see :func:`trl_loss_options`).

    Parameters
    ----------
    args : a ``trl.DPOConfig``.
    mode, backend, memory_budget : the module's engine options.
    **extra : more module options (e.g. WPO's ``chosen_weights`` / ``rejected_weights`` tensors).

    Returns
    -------
    FusedLinearPreferenceLoss

    Raises
    ------
    NotImplementedError, ValueError
        As :func:`trl_loss_options`; NotImplementedError for a list of loss types on a prefkern core without
        weighted lists (issue #14 item 4).
    """
    kwargs = {**trl_loss_options(args), **extra}
    loss_type = kwargs.pop("loss_type")
    try:
        return FusedLinearPreferenceLoss(loss_type, mode=mode, backend=backend, memory_budget=memory_budget,
                                         **kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(loss_type, list) and ("unhashable" in str(e) or "not in the catalog" in str(e)):
            raise NotImplementedError(
                f"loss_type {loss_type} with loss_weights needs FusedLinearPreferenceLoss with weighted lists of DPO "
                "loss types (prefkern issue #14 item 4); this prefkern has none") from e
        raise


# ---- PrefkernDPOTrainer -----------------------------------------------------------------------------------------

_HOOK_ATTR = "_prefkern_hidden_forward"


def _install_hidden_forward(model: Any) -> None:
    """Wrap ``model.forward`` (already patched by TRL's ``add_fused_lm_head``) so that
    ``model(..., labels=labels, prefkern_loss=fn)`` runs the backbone and returns ``fn(hidden, weight, bias,
    labels)`` with the shifted ``[R, T-1, H]`` hidden states and ``[R, T-1]`` labels, inside TRL's ZeRO-3 gather
    context for the head. Any other call goes to the forward underneath."""
    if getattr(model, _HOOK_ATTR, False):
        return
    inner = model.forward
    utils = _trl_utils()

    def forward(self, *args, prefkern_loss=None, labels=None, **kwargs):
        if prefkern_loss is None:
            if labels is not None:
                kwargs["labels"] = labels
            return inner(*args, **kwargs)
        kwargs.pop("fused_lm_head", None)
        kwargs["use_cache"] = False
        backbone = self.base_model
        hidden = backbone(*args, **kwargs).last_hidden_state[:, :-1]
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        hidden = hidden.to(weight.device)
        shifted = labels[:, 1:].to(weight.device)
        with utils.maybe_gather_lm_head_ctx(weight, bias):
            return prefkern_loss(hidden, weight, bias, shifted)

    model.forward = types.MethodType(forward, model)
    setattr(model, _HOOK_ATTR, True)


def _trainer_class():
    from trl import DPOTrainer

    if not _fused_head_trl():
        import trl

        raise RuntimeError(f"PrefkernDPOTrainer needs TRL >= 1.15 (add_fused_lm_head), found {trl.__version__}: "
                           "with TRL 1.14 use DPOConfig(use_liger_kernel=True) inside use_prefkern_lm_head(); with "
                           "TRL <= 1.13, prefkern.compat.liger.trl_patch.patch_trl()")

    trainer_module = sys.modules[DPOTrainer.__module__]
    utils = _trl_utils()

    class PrefkernDPOTrainerImpl(DPOTrainer):
        """TRL's ``DPOTrainer`` with the policy loss on :class:`prefkern.FusedLinearPreferenceLoss` (eager: the
        gradient of the lm-head taken inside forward, 3 GEMM units, logits never whole) and the reference
        log-probs on prefkern's seam (:func:`use_prefkern_lm_head`).

        Parameters
        ----------
        *args, **kwargs : ``DPOTrainer``'s.
        prefkern_mode : ``"auto"``, ``"eager"`` or ``"stream"`` (the loss module's mode).
        prefkern_backend : prefkern's row-kernel backend.
        memory_budget : bytes of one eager chunk of fp32 logits (None: a tenth of free memory).
        logits_metrics : log ``entropy`` and ``mean_token_accuracy`` like TRL, from the loss's own pass over the
            logits (``return_stats=True``: no extra GEMM); False skips them. WPO (``use_weighting``) needs the
            statistics before the loss and pays one more matmul unit without gradient for them.
            ``logits/chosen`` and ``logits/rejected`` are always logged (exact sums, no logits).

        Raises
        ------
        NotImplementedError
            At construction, for what the fused loss cannot honour: ``padding_free``, a soft-capped head on a
            prefkern without ``logit_softcap``, prompt-learning PEFT (virtual tokens), a Mixture-of-Experts
            auxiliary loss, a list of loss types on a prefkern without weighted lists.
        """

        def __init__(self, *args: Any, prefkern_mode: str = "auto", prefkern_backend: str = "auto",
                     memory_budget: Optional[int] = None, logits_metrics: bool = True, **kwargs: Any) -> None:
            config = kwargs.get("args", args[2] if len(args) > 2 else None)
            self._prefkern_engine = {"mode": prefkern_mode, "backend": prefkern_backend,
                                     "memory_budget": memory_budget}
            if config is not None:
                from_trl(config, **self._prefkern_engine)  # options it cannot honour raise before any work
            self.logits_metrics = bool(logits_metrics)
            super().__init__(*args, **kwargs)
            self.prefkern_loss = from_trl(self.args, **self._prefkern_engine)
            self._check_model()
            target = self.model.get_base_model() if self._is_peft(self.model) else self.model
            _install_hidden_forward(target)
            transform = model_logit_transform(target)
            # the module applies the head's transform; nothing is folded into the hidden states
            self._transform_options = {"logit_scale": transform.scale, "logit_softcap": transform.softcap}
            self._stats_transform = transform
            self.prefkern_loss = from_trl(self.args, **self._prefkern_engine, **self._transform_options,
                                          return_stats=self.logits_metrics)

        @staticmethod
        def _is_peft(model: Any) -> bool:
            return hasattr(model, "peft_config") and hasattr(model, "get_base_model")

        def _check_model(self) -> None:
            if self.aux_loss_enabled:
                raise NotImplementedError("the MoE router auxiliary loss is not routed by PrefkernDPOTrainer: use "
                                          "DPOTrainer inside use_prefkern_lm_head()")
            if self._is_peft(self.model):
                cfg = self.model.peft_config.get(getattr(self.model, "active_adapter", "default"))
                if cfg is not None and getattr(cfg, "is_prompt_learning", False):
                    raise NotImplementedError("prompt-learning PEFT prepends virtual tokens to the hidden states: "
                                              "use DPOTrainer inside use_prefkern_lm_head()")
            if getattr(self, "_is_vision_dataset", False):
                raise NotImplementedError("vision-language batches are not routed by PrefkernDPOTrainer: use "
                                          "DPOTrainer inside use_prefkern_lm_head()")

        # reference log-probs: TRL's code through prefkern's seam (precomputed or per step)
        def compute_ref_log_probs(self, model, inputs):
            with use_prefkern_lm_head():
                return super().compute_ref_log_probs(model, inputs)

        def _reference_token_logps(self, model_kwargs, labels, seq_len):
            ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
            with torch.no_grad(), use_prefkern_lm_head(), trainer_module.disable_gradient_checkpointing(
                    self.model, self.args.gradient_checkpointing_kwargs):
                if self.ref_model is None:
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    adapter = "ref" if "ref" in getattr(unwrapped, "peft_config", {}) else None
                    with trainer_module.use_adapter(unwrapped, adapter_name=adapter):
                        out = self.model(**ref_kwargs, labels=labels, fused_lm_head=True)
                else:
                    out = self.ref_model(**ref_kwargs, labels=labels, fused_lm_head=True)
            return out.log_probs[:, -seq_len:]

        def _fused_policy_loss(self, ref_logps, use_weighting):
            transform, metrics = self._stats_transform, self.logits_metrics

            def loss_fn(hidden, weight, bias, labels):
                mask = labels != -100
                module, stats = self.prefkern_loss, None
                if use_weighting:
                    # WPO's weights enter the loss: the statistics come first, from a pass without gradient
                    flat = mask.reshape(-1)
                    h2 = hidden.detach().reshape(-1, hidden.shape[-1])[flat]
                    y = labels.reshape(-1)[flat]
                    with torch.no_grad():
                        logp, ts = _token_logps(h2, weight.detach(), None if bias is None else bias.detach(), y,
                                                transform, self._prefkern_engine["backend"], True)
                        stats = {"log_probs": logp, **_stats_dict(ts, weight.shape[0])}
                    stats = {k: v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in stats.items()}
                    lengths = mask.sum(1).clamp(min=1)
                    w = torch.exp(((stats["log_probs"] - stats["log_sum_sq_probs"]) * mask).sum(1) / lengths)
                    b = w.shape[0] // 2
                    module = from_trl(self.args, **{**self._prefkern_engine, "mode": "stream"},
                                      **self._transform_options, chosen_weights=w[:b], rejected_weights=w[b:])
                out = module(hidden, weight, labels, bias, ref_logps=ref_logps)
                if stats is None and out.token_stats is not None:
                    stats = _stats_dict(out.token_stats, weight.shape[0])
                means = stats["mean_logits"] if stats is not None else _logit_means(hidden, weight, bias, mask)
                return out, stats if metrics else None, means

            return loss_fn

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            skip = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
            model_kwargs = {k: v for k, v in inputs.items() if k not in skip}
            model_kwargs["use_cache"] = False
            completion_mask = inputs["completion_mask"]
            seq_len = completion_mask.shape[1] - 1
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            if self.precompute_ref_logps:
                ref = (inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
            else:
                ref = self._reference_token_logps(model_kwargs, labels, seq_len)
            out, stats, means = model(**model_kwargs, labels=labels,
                                      prefkern_loss=self._fused_policy_loss(ref, self.use_weighting))
            self._log_metrics(mode, inputs, completion_mask[:, 1:].bool(), out, stats, means)
            if return_outputs:
                with torch.no_grad():
                    return out.loss, model(**model_kwargs)
            return out.loss

        def _log_metrics(self, mode, inputs, mask, out, stats, means):
            log = self._metrics[mode]
            gather = self.accelerator.gather_for_metrics
            b = mask.shape[0] // 2
            if stats is not None:
                count = gather(mask.sum()).sum()
                ent = gather((stats["entropy"] * mask).sum()).sum()
                log["entropy"].append((ent / count).item() if count > 0 else 0.0)
            if mode == "train":
                tokens = gather(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens // self._tp_size
            log["num_tokens"] = [self._total_train_tokens]
            for name, half in (("chosen", slice(0, b)), ("rejected", slice(b, None))):
                total = gather((means[half] * mask[half]).sum()).sum().item()
                count = gather(mask[half].sum()).sum().item()
                log[f"logits/{name}"].append(total / count if count > 0 else 0.0)
            if stats is not None:
                correct = gather((stats["is_top1"][:b].bool() & mask[:b]).sum()).sum()
                total = gather(mask[:b].sum()).sum()
                log["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)
            chosen = self.accelerator.gather(out.chosen_rewards.detach())
            rejected = self.accelerator.gather(out.rejected_rewards.detach())
            log["rewards/chosen"].append(chosen.mean().item())
            log["rewards/rejected"].append(rejected.mean().item())
            log["rewards/accuracies"].append((chosen > rejected).float().mean().item())
            log["rewards/margins"].append((chosen - rejected).mean().item())
            for name in ("logps/chosen", "logps/rejected"):
                log[name].append(self.accelerator.gather(out.metrics[name].detach().reshape(1)).mean().item())

    PrefkernDPOTrainerImpl.__name__ = PrefkernDPOTrainerImpl.__qualname__ = "PrefkernDPOTrainer"
    PrefkernDPOTrainerImpl.__module__ = __name__
    del utils
    return PrefkernDPOTrainerImpl


def _logit_means(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 mask: torch.Tensor) -> torch.Tensor:
    """[R, T] mean over V of each position's logits, ``x . sum_v W_v / V (+ mean b)``, without the logits (fp32)."""
    with torch.no_grad():
        cols = weight.detach().sum(0, dtype=torch.float32)
        means = (hidden.detach().float() @ cols) / weight.shape[0]
        if bias is not None:
            means = means + bias.detach().float().mean()
        return means * mask


_CLASSES: Dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    if name == "PrefkernDPOTrainer":
        if name not in _CLASSES:
            _CLASSES[name] = _trainer_class()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
