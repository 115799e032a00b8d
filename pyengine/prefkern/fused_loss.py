"""``FusedLinearPreferenceLoss``: any loss of the catalog straight from hidden states and the lm-head.

The logits ``[2B, T, V]`` never exist. Two modes (DESIGN.md section 4):

- ``stream``: token log-probs through :func:`prefkern.linear_logprobs` (online log-sum-exp forward,
  recomputing backward), then the catalog loss in plain torch. Works for every loss type. Cost:
  4 matmul units for the policy; extra memory one chunk (CPU) or O(N) (Triton tiles).
- ``eager``: for losses that decompose per pair (KTO: per example), chunks of whole pairs (examples)
  are pushed through the GEMM once; the chunk's loss gradient is taken at once and the logit gradient
  written in place over the chunk's logits, followed by the dX and dW GEMMs -- all inside forward, so
  backward only scales the stored gradients (:mod:`prefkern.fused.eager`). Cost: 3 matmul units; extra
  memory one chunk of fp32 logits.

``mode="auto"`` takes eager when the loss allows it and one chunk fits ``memory_budget``. The choice, the backend
and the budget are made once per call by :func:`prefkern.fused.fused_loss`; this module only maps its arguments
onto a :class:`~prefkern.fused.CatalogObjective`.

Under ``torch.compile(fullgraph=True)`` the paired losses stream (the eager pass runs autograd inside forward
over chunks chosen from the data, which Dynamo cannot trace), and the checks that read values (empty
completions, non-finite inputs or loss) are skipped while tracing. KTO's outputs are sized by the number of
desirable examples and break the graph; SALT compiles like the paired losses.

Differentiable outputs, in both modes: ``loss`` and ``losses`` (per pair / per example). Rewards and metrics are
detached, as in the catalog. In eager mode ``loss`` carries the gradients taken in forward (backpropagate it once);
a gradient through ``losses`` takes the stream backward (recompute, dX, dW) for what reaches it.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import replace
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import nn

from ._validation import (
    check_choice, check_flag, check_floating, check_ignore_index, check_integer, check_lm_head, check_number,
    check_tensor,
)
from .fused.engine import MODES, EngineOptions, default_memory_budget, fused_loss, token_logps_no_grad
from .fused.objective import CatalogObjective, CatalogUnpairedObjective
from .losses import PreferenceLossOutput
from .losses.registry import LOSS_REGISTRY, available_loss_types, loss_entry
from .ops.linear_logprobs import linear_logprobs, logit_transform, shift_labels
from .distributed.vocab_parallel import VocabParallel, resolve_vocab_parallel
from .distributed.vocab_parallel import check_inputs as check_vocab_parallel_inputs

#: loss types whose batch loss splits into per-pair (KTO: per-example) shares: eager mode applies to them
EAGER_LOSS_TYPES = frozenset([name for name, entry in LOSS_REGISTRY.items() if entry.per_pair] + ["rpo"])
UNPAIRED_LOSS_TYPES = frozenset(name for name, entry in LOSS_REGISTRY.items() if entry.unpaired)

RefLogps = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None]


class FusedLinearPreferenceLoss(nn.Module):
    """Preference loss from last hidden states and the lm-head, logits never materialised.

    Parameters
    ----------
    loss_type : a name of :func:`prefkern.preference_loss` (``"sigmoid"``, ``"ipo"``, ``"simpo"``,
        ``"orpo"``, ``"cpo"``, ``"kto"``, ``"salt"``, ...; ``"rpo"`` = DPO + NLL), or a list of DPO-family
        names summed with ``loss_weights`` (TRL's multi-loss, e.g. MPO ``["sigmoid", "bco_pair", "sft"]``). The unpaired types
        (``"kto"``, ``"apo_zero_unpaired"``) construct a :class:`FusedLinearUnpairedLoss`.
    beta : the loss's beta (passed when the family takes one; default: the family's own default,
        e.g. 0.1 for DPO, 2.0 for SimPO).
    ignore_index : label value of prompt and padding positions.
    average_log_prob : DPO-family losses see length-averaged log-probs instead of sums.
    nll_weight : DPO-family losses add ``nll_weight`` x the chosen token-mean NLL (RPO).
    mode : ``"auto"``, ``"stream"`` or ``"eager"`` (see the module docstring).
    memory_budget : bytes the eager logits chunk may take (default a tenth of free memory).
    shift : 0 when ``labels`` are aligned with ``hidden`` (position t scores ``labels[:, t]``); 1 when
        ``labels`` are the input ids of a causal LM (position t scores token t+1; the last position scores
        nothing). TRL's and Liger's fused paths pass already-shifted labels (shift=0).
    backend : backend of the log-prob kernels (``"auto"``, ``"native"``, ``"triton"``, ``"cuda"``, ``"torch"``).
    empty_completions : ``"raise"`` (default), ``"drop"`` (TRL >= 0.29; stream only) or ``"keep"``,
        for a pair whose chosen or rejected completion has no scored token.
    ld_alpha : LD-DPO weighting of the sequence sums.
    temperature, logit_scale, logit_softcap : the model's logits are ``softcap(logit_scale * z) / temperature``
        (TRL's ``temperature``; Cohere's ``logit_scale``; Gemma 2's ``final_logit_softcapping``), for the policy
        and the reference pass alike.
    deterministic : False lets stream mode run the Triton register-tile kernels on a GPU (nothing of size V in
        memory; dX / dW summed with fp32 atomics, so run-to-run different in the last bits).
    vocab_parallel : None, True (the head is a ``Shard(0)`` DTensor) or a :class:`prefkern.distributed.VocabParallel`.
    return_stats : the output's ``token_stats`` gets the policy's per-token entropy, ``log sum p^2``, logit sum and
        top-1 agreement ([R, T] each, no gradient), computed from the logits chunks the loss already forms (no
        extra GEMM; one more read of each chunk). Not with ``deterministic=False`` or a vocab-parallel head.
    **loss_kwargs : any other option of the family function (``label_smoothing``, ``gamma_beta_ratio``,
        ``cpo_alpha``, ``desirable_weight``, ``form``, ...).

    Forward inputs
    --------------
    hidden : [2B, T, H] ``[chosen; rejected]`` last hidden states (KTO: [B, T, H] unpaired).
    weight : [V, H] lm-head; bias : [V] or None.
    labels : [2B, T] target ids, ``ignore_index`` off the completion.
    ref_hidden, ref_weight, ref_bias : the reference model's hidden states and head (``ref_weight``
        defaults to ``weight``), run without gradient; or
    ref_logps : precomputed reference log-probs, [2B] per sequence (or a (chosen, rejected) pair of [B]),
        or [2B, T] per token.
    token_weights : [2B, T] SALT weights (chosen rows = edited text, rejected rows = model output).

    Returns
    -------
    :class:`prefkern.losses.PreferenceLossOutput` (loss, per-example losses, rewards, metrics); ``loss`` and
    ``losses`` are differentiable in both modes.
    """

    def __new__(cls, loss_type: str = "sigmoid", *args: Any, **kwargs: Any):
        if cls is FusedLinearPreferenceLoss and isinstance(loss_type, str) and loss_type in UNPAIRED_LOSS_TYPES:
            return super().__new__(FusedLinearUnpairedLoss)
        return super().__new__(cls)

    def __init__(
        self,
        loss_type: str = "sigmoid",
        beta: Optional[float] = None,
        ignore_index: int = -100,
        average_log_prob: bool = False,
        nll_weight: float = 0.0,
        mode: str = "auto",
        memory_budget: Optional[int] = None,
        shift: int = 0,
        backend: str = "auto",
        empty_completions: str = "raise",
        ld_alpha: Optional[float] = None,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        logit_softcap: Optional[float] = None,
        deterministic: bool = True,
        vocab_parallel: Any = None,
        return_stats: bool = False,
        **loss_kwargs: Any,
    ) -> None:
        super().__init__()
        self.return_stats = check_flag("return_stats", return_stats)
        if self.return_stats and (not deterministic or vocab_parallel is not None):
            raise ValueError("return_stats runs on the chunked paths of a whole head: it needs deterministic=True and "
                             "no vocab_parallel")
        if vocab_parallel is not None and vocab_parallel is not True and not isinstance(vocab_parallel, VocabParallel):
            raise TypeError(f"vocab_parallel must be None, True or a prefkern.distributed.VocabParallel, got "
                            f"{type(vocab_parallel).__name__}")
        self.vocab_parallel = vocab_parallel
        if loss_type == "c3po":
            raise ValueError("c3po adds constraint terms on other prompts: compute its token log-probs with "
                             "prefkern.linear_logprobs and call prefkern.c3po_loss")
        loss_type = _loss_name_or_list(loss_type)
        check_choice("mode", mode, MODES)
        per_pair = loss_entry(loss_type, dict(loss_kwargs)).per_pair
        if mode == "eager" and not per_pair:
            raise ValueError(f"mode='eager' needs a loss that decomposes per pair ({sorted(EAGER_LOSS_TYPES)}); "
                             f"{loss_type!r} must stream")
        tensor_options = sorted(k for k, v in loss_kwargs.items() if isinstance(v, torch.Tensor))
        if mode == "eager" and tensor_options:
            raise ValueError(f"per-example options {tensor_options} are not split across eager chunks: "
                             "use mode='stream'")
        check_choice("empty_completions", empty_completions, ("raise", "drop", "keep"))
        if mode == "eager" and empty_completions == "drop":
            raise ValueError("empty_completions='drop' changes the batch: use mode='stream'")
        if memory_budget is not None and check_integer("memory_budget", memory_budget) <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        family = loss_entry(loss_type).fn
        is_dpo = family is LOSS_REGISTRY["sigmoid"].fn
        if (average_log_prob or nll_weight) and not is_dpo:
            raise ValueError("average_log_prob and nll_weight apply to DPO-family losses; other families take their "
                             "own options (e.g. sft_weight for SimPO, cpo_alpha for CPO)")
        self.loss_type, self.beta = loss_type, beta
        self.ignore_index = check_ignore_index(ignore_index)
        self.average_log_prob, self.nll_weight = average_log_prob, check_number("nll_weight", nll_weight)
        self.mode, self.memory_budget, self.backend = mode, memory_budget, backend
        self.shift = check_integer("shift", shift, low=0)
        self.empty_completions, self.ld_alpha = empty_completions, ld_alpha
        self.transform = logit_transform(temperature, logit_scale, logit_softcap)
        self.deterministic = check_flag("deterministic", deterministic)
        self._takes_beta = beta is not None and "beta" in _parameters(family)
        self._takes_reference = "ref_chosen_logps" in _parameters(family) or "ref_logps" in _parameters(family)
        self.loss_spec, self.loss_kwargs = self._catalog_call(loss_kwargs)

    def _catalog_call(self, extra: dict) -> Tuple[Any, dict]:
        """The :func:`prefkern.preference_loss` name (or list) and keyword arguments this module computes."""
        kwargs = dict(extra)
        if self._takes_beta:
            kwargs.setdefault("beta", self.beta)
        if not self.nll_weight:
            return self.loss_type, kwargs
        if self.loss_type == "rpo":
            return "rpo", {**kwargs, "rpo_alpha": self.nll_weight}
        types = list(self.loss_type) if isinstance(self.loss_type, list) else [self.loss_type]
        weights = list(kwargs.pop("loss_weights", [1.0] * len(types)))
        return types + ["sft"], {**kwargs, "loss_weights": weights + [self.nll_weight]}

    @property
    def engine_options(self) -> EngineOptions:
        return EngineOptions(self.ignore_index, self.mode, self.backend, self.memory_budget, type(self).__name__,
                             self.transform, self.deterministic, self.vocab_parallel, self.return_stats)

    def _run(self, hidden, weight, bias, labels, objective) -> PreferenceLossOutput:
        result = fused_loss(hidden, weight, bias, labels, objective, self.engine_options)
        return replace(result.output, token_stats=result.stats) if self.return_stats else result.output

    def _check_head(self, hidden, weight, labels, bias, names=("hidden", "weight", "labels", "bias"), **kwargs):
        """check_lm_head, or the vocab-parallel checks (this rank's slice, possibly empty) when the head is split."""
        w, b, vp = resolve_vocab_parallel(weight, bias, self.vocab_parallel)
        if vp is None:
            check_lm_head(hidden, weight, labels, bias, names=names, **kwargs)
        else:
            check_vocab_parallel_inputs(hidden, w, labels, b, vp, tuple(names))

    def _reference_free(self) -> bool:
        return bool(self.loss_kwargs.get("reference_free")) or self.loss_type == "sft" or not self._takes_reference

    # ---- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        ref_hidden: Optional[torch.Tensor] = None,
        ref_weight: Optional[torch.Tensor] = None,
        ref_bias: Optional[torch.Tensor] = None,
        ref_logps: RefLogps = None,
        *,
        token_weights: Optional[torch.Tensor] = None,
    ) -> PreferenceLossOutput:
        labels = self._inputs(hidden, weight, labels, bias, "[2B, T, H] ([chosen; rejected])")
        if hidden.shape[0] % 2 != 0 or hidden.shape[0] == 0:
            raise ValueError(f"hidden must stack [chosen; rejected] along a non-zero even first dim, got {tuple(hidden.shape)}")
        if ref_hidden is not None and ref_logps is not None:
            raise ValueError("pass either ref_hidden (a reference model) or ref_logps (precomputed), not both")
        mask = labels != self.ignore_index
        if self.loss_type == "salt":
            return self._salt(hidden, weight, labels, bias, token_weights, mask)
        ref_seq, ref_tokens = self._reference(ref_hidden, ref_weight, ref_bias, weight, bias, labels, ref_logps)
        if ref_seq is None and ref_tokens is None and not self._reference_free():
            raise ValueError(f"loss_type {self.loss_type!r} needs reference log-probs: pass ref_hidden (+ ref_weight) "
                             "or ref_logps")
        objective = CatalogObjective(self.loss_spec, self.loss_kwargs, mask, ref_seq=ref_seq, ref_tokens=ref_tokens,
                                     average_log_prob=self.average_log_prob, ld_alpha=self.ld_alpha,
                                     empty_completions=self.empty_completions)
        return self._run(hidden, weight, bias, labels, objective)

    def _inputs(self, hidden, weight, labels, bias, layout: str) -> torch.Tensor:
        """Checks (before any GEMM) and the shifted int64 labels."""
        if check_tensor("hidden", hidden).dim() != 3:
            raise ValueError(f"hidden must have shape {layout}, got {tuple(hidden.shape)}")
        self._check_head(hidden, weight, labels, bias, hidden_shape=layout)
        return shift_labels(labels.to(torch.int64), self.shift, self.ignore_index)

    def _reference(self, ref_hidden, ref_weight, ref_bias, weight, bias, labels, ref_logps):
        """(per-sequence (chosen, rejected) or None, token-level [2B, T] or None), detached."""
        if ref_hidden is not None:
            return None, self._reference_tokens(ref_hidden, ref_weight, ref_bias, weight, bias, labels, "ref_hidden")
        if ref_logps is None:
            return None, None
        if isinstance(ref_logps, (tuple, list)):
            if len(ref_logps) != 2:
                raise ValueError(f"ref_logps as a sequence must be (chosen [B], rejected [B]), got {len(ref_logps)} items")
            rc, rr = (check_floating(n, t) for n, t in zip(("ref_logps[0]", "ref_logps[1]"), ref_logps))
            return (rc.detach().float(), rr.detach().float()), None
        check_floating("ref_logps", ref_logps)
        b2 = labels.shape[0]
        if tuple(ref_logps.shape) == (b2,):
            return (ref_logps[: b2 // 2].detach().float(), ref_logps[b2 // 2:].detach().float()), None
        if tuple(ref_logps.shape) == tuple(labels.shape):
            return None, ref_logps.detach().float()
        raise ValueError(f"ref_logps must have shape [2B] = [{b2}] (per sequence) or [2B, T] = "
                         f"{list(labels.shape)} (per token), got {tuple(ref_logps.shape)}")

    def _reference_tokens(self, ref_hidden, ref_weight, ref_bias, weight, bias, labels, name: str) -> torch.Tensor:
        """[R, T] reference token log-probs, no gradient; the head defaults to the policy's (and its bias)."""
        check_tensor(name, ref_hidden)
        if ref_hidden.dim() != 3 or tuple(ref_hidden.shape[:2]) != tuple(labels.shape):
            raise ValueError(f"{name} must have shape [R, T, H'] with [R, T] = {tuple(labels.shape)}, "
                             f"got {tuple(ref_hidden.shape)}")
        rw, rb = (ref_weight, ref_bias) if ref_weight is not None else (weight, bias)
        self._check_head(ref_hidden, rw, labels, rb, names=(name, "ref_weight", "labels", "ref_bias"))
        return token_logps_no_grad(ref_hidden, rw, rb, labels, self.ignore_index, self.backend, self.transform,
                                   self.vocab_parallel)

    # ---- token-level loss -------------------------------------------------------------------------------

    def _salt(self, hidden, weight, labels, bias, token_weights, mask) -> PreferenceLossOutput:
        if token_weights is None or tuple(token_weights.shape) != tuple(labels.shape):
            raise ValueError(f"loss_type 'salt' needs token_weights of shape {tuple(labels.shape)} ([edited; generated])")
        t = self.transform
        token_logps = linear_logprobs(hidden, weight, labels, bias, ignore_index=self.ignore_index, backend=self.backend,
                                      temperature=t.temperature, logit_scale=t.scale, logit_softcap=t.softcap,
                                      vocab_parallel=self.vocab_parallel, return_stats=self.return_stats)
        token_logps, stats = token_logps if self.return_stats else (token_logps, None)
        b = labels.shape[0] // 2
        kwargs = dict(self.loss_kwargs)
        if isinstance(self.vocab_parallel, VocabParallel) and "vocab_size" not in kwargs:
            raise ValueError("loss_type 'salt' on a vocab-parallel head needs vocab_size= (the whole head's V)")
        kwargs.setdefault("vocab_size", weight.shape[0])  # a DTensor's shape is the whole head's
        w = token_weights * mask
        out = loss_entry("salt").fn(token_logps[:b], w[:b], token_logps[b:], w[b:], **kwargs)
        return replace(out, token_stats=stats) if self.return_stats else out


class FusedLinearUnpairedLoss(FusedLinearPreferenceLoss):
    """KTO and APO-zero-unpaired from hidden states and the lm-head, on an unpaired batch.

    ``FusedLinearPreferenceLoss("kto", ...)`` constructs this class; the constructor's parameters are those of
    :class:`FusedLinearPreferenceLoss`.

    Forward inputs
    --------------
    hidden : [B, T, H] last hidden states of the completions; weight : [V, H]; labels : [B, T]; bias : [V] or None.
    ref_hidden (+ ref_weight, ref_bias) or ref_logps [B] : the reference model's sequence log-probs.
    desirable : [B] bool (or 0/1 integers), True for a desirable example (``kto_labels`` is its old name).
    kl_hidden, kl_labels (+ ref_kl_hidden or ref_kl_logps [B]) : the mismatched-pair batch of KTO's KL reference
        point.

    Returns
    -------
    :class:`prefkern.losses.PreferenceLossOutput`; ``loss`` and ``losses`` differentiable.
    """

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        ref_hidden: Optional[torch.Tensor] = None,
        ref_weight: Optional[torch.Tensor] = None,
        ref_bias: Optional[torch.Tensor] = None,
        ref_logps: Optional[torch.Tensor] = None,
        *,
        desirable: Optional[torch.Tensor] = None,
        kl_hidden: Optional[torch.Tensor] = None,
        kl_labels: Optional[torch.Tensor] = None,
        ref_kl_hidden: Optional[torch.Tensor] = None,
        ref_kl_logps: Optional[torch.Tensor] = None,
        kto_labels: Optional[torch.Tensor] = None,
    ) -> PreferenceLossOutput:
        if kto_labels is not None:
            if desirable is not None:
                raise ValueError("pass desirable (kto_labels is its deprecated name), not both")
            warnings.warn("kto_labels is deprecated: pass desirable=", DeprecationWarning, stacklevel=2)
            desirable = kto_labels
        labels = self._inputs(hidden, weight, labels, bias, "[B, T, H]")
        if hidden.shape[0] == 0:
            raise ValueError(f"hidden must have at least one example, got {tuple(hidden.shape)}")
        if ref_hidden is not None and ref_logps is not None:
            raise ValueError("pass either ref_hidden (a reference model) or ref_logps (precomputed), not both")
        n = hidden.shape[0]
        if not isinstance(desirable, torch.Tensor) or tuple(desirable.shape) != (n,):
            raise ValueError(f"KTO needs desirable (formerly kto_labels) of shape [B] = [{n}] (True = desirable)")
        mask = labels != self.ignore_index
        if ref_hidden is not None:
            ref = (self._reference_tokens(ref_hidden, ref_weight, ref_bias, weight, bias, labels, "ref_hidden")
                   * mask).sum(-1)
        elif ref_logps is not None and tuple(check_floating("ref_logps", ref_logps).shape) == (n,):
            ref = ref_logps.detach().float()
        else:
            raise ValueError("KTO needs ref_hidden or ref_logps of shape [B]")
        kl_kwargs = self._kl_point(weight, bias, ref_weight, ref_bias, kl_hidden, kl_labels, ref_kl_hidden,
                                   ref_kl_logps)
        objective = CatalogUnpairedObjective(self.loss_type, self.loss_kwargs, mask, ref, desirable, kl_kwargs)
        return self._run(hidden, weight, bias, labels, objective)

    def _kl_point(self, weight, bias, ref_weight, ref_bias, kl_hidden, kl_labels, ref_kl_hidden, ref_kl_logps):
        if kl_hidden is None:
            return {}
        if kl_labels is None:
            raise ValueError("kl_hidden needs kl_labels")
        self._check_head(kl_hidden, weight, kl_labels, bias, names=("kl_hidden", "weight", "kl_labels", "bias"))
        kl_labels = shift_labels(kl_labels.to(torch.int64), self.shift, self.ignore_index)
        kl_mask = kl_labels != self.ignore_index
        kwargs = {"kl_policy_logps": (token_logps_no_grad(kl_hidden, weight, bias, kl_labels, self.ignore_index,
                                                          self.backend, self.transform, self.vocab_parallel)
                                        * kl_mask).sum(-1)}
        if ref_kl_hidden is not None:
            kwargs["kl_ref_logps"] = (self._reference_tokens(ref_kl_hidden, ref_weight, ref_bias, weight, bias,
                                                             kl_labels, "ref_kl_hidden") * kl_mask).sum(-1)
        elif ref_kl_logps is not None:
            kwargs["kl_ref_logps"] = check_floating("ref_kl_logps", ref_kl_logps).detach().float()
        else:
            raise ValueError("kl_hidden needs ref_kl_hidden or ref_kl_logps")
        return kwargs


def _loss_name_or_list(loss_type: object) -> Union[str, List[str]]:
    """A catalog name, or a list of DPO-family names (TRL's multi-loss, weighted by ``loss_weights``)."""
    if isinstance(loss_type, (list, tuple)):
        if not loss_type:
            raise ValueError("loss_type must not be an empty list")
        names = []
        for t in loss_type:
            if not isinstance(t, str):
                raise TypeError(f"loss_type entries must be strings, got {type(t).__name__}")
            if t not in LOSS_REGISTRY or LOSS_REGISTRY[t].fn is not LOSS_REGISTRY["sigmoid"].fn:
                raise ValueError(f"a list loss_type combines DPO-family losses (dpo_loss types); {t!r} is not one")
            names.append("sigmoid" if t == "dpo" else t)
        return names
    if not isinstance(loss_type, str) or (loss_type not in LOSS_REGISTRY and loss_type != "rpo"):
        raise ValueError(f"loss_type {loss_type!r} is not in the catalog; choose from {available_loss_types()}")
    return loss_type


def _parameters(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


__all__ = ["FusedLinearPreferenceLoss", "FusedLinearUnpairedLoss", "EAGER_LOSS_TYPES", "UNPAIRED_LOSS_TYPES",
           "default_memory_budget"]
