"""``FusedLinearPreferenceLoss``: any loss of the catalog straight from hidden states and the lm-head.

The logits ``[2B, T, V]`` never exist. Two modes (DESIGN.md section 4):

- ``stream``: token log-probs through :func:`prefkern.linear_logprobs` (online log-sum-exp forward,
  recomputing backward), then the catalog loss in plain torch. Works for every loss type. Cost:
  4 matmul units for the policy; extra memory one chunk (CPU) or O(N) (Triton tiles).
- ``eager``: for losses that decompose per pair (KTO: per example), chunks of whole pairs (examples)
  are pushed through the GEMM once; the chunk's loss gradient is taken at once and the logit gradient
  written in place over the chunk's logits, followed by the dX and dW GEMMs -- all inside forward, so
  backward only scales the stored gradients (:mod:`prefkern.eager`). Cost: 3 matmul units; extra
  memory one chunk of fp32 logits.

``mode="auto"`` takes eager when the loss allows it and one chunk fits ``memory_budget``.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ._validation import check_tensor
from .eager import default_memory_budget, eager_applies, eager_chunks, pair_fits, with_gradients
from .losses import PreferenceBatch, PreferenceLossOutput, preference_batch
from .losses.registry import LOSS_REGISTRY
from .ops.linear_logprobs import linear_logprobs, shift_labels

# Losses whose batch value is a mean over pairs of per-pair terms (plus a token-mean NLL), so that
# a chunk of pairs gives its exact share of the gradient; KTO's is a mean over examples once its KL
# reference point (from a separate batch, without gradient) is known. aot* sort across the batch and
# bco_pair keeps a running mean: they stream.
EAGER_LOSS_TYPES = frozenset({
    "sigmoid", "dpo", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "sppo_hard", "apo_zero", "apo_down",
    "discopop", "sft", "sigmoid_norm", "cdpo", "rpo", "simpo", "simpo_hinge", "orpo", "cpo", "cpo_hinge",
    "cpo_ipo", "cpo_simpo", "alphapo", "ipo_paper", "slic_hf", "kto", "apo_zero_unpaired",
})
def _family(loss_type: str) -> Callable[..., PreferenceLossOutput]:
    if loss_type == "rpo":
        return LOSS_REGISTRY["sigmoid"][0]
    if loss_type not in LOSS_REGISTRY:
        raise ValueError(f"loss_type {loss_type!r} is not in the catalog; choose from {sorted(LOSS_REGISTRY) + ['rpo']}")
    return LOSS_REGISTRY[loss_type][0]


class FusedLinearPreferenceLoss(nn.Module):
    """Preference loss from last hidden states and the lm-head, logits never materialised.

    Parameters
    ----------
    loss_type : a name of :func:`prefkern.preference_loss` (``"sigmoid"``, ``"ipo"``, ``"simpo"``,
        ``"orpo"``, ``"cpo"``, ``"kto"``, ``"salt"``, ...; ``"rpo"`` = DPO + NLL).
    beta : the loss's beta (passed when the family takes one; default: the family's own default,
        e.g. 0.1 for DPO, 2.0 for SimPO).
    ignore_index : label value of prompt and padding positions.
    average_log_prob : DPO-family losses see length-averaged log-probs instead of sums.
    nll_weight : DPO-family losses add ``nll_weight`` x the chosen token-mean NLL (RPO).
    mode : ``"auto"``, ``"stream"`` or ``"eager"`` (see the module docstring).
    memory_budget : bytes the eager logits chunk may take (default a tenth of free memory).
    shift : 1 when ``labels`` are the input ids of a causal LM (position t scores token t+1).
    backend : backend of the log-prob kernels (``"auto"``, ``"native"``, ``"triton"``, ``"cuda"``, ``"torch"``).
    empty_completions : ``"raise"`` (default), ``"drop"`` (TRL >= 0.29; stream only) or ``"keep"``,
        for a pair whose chosen or rejected completion has no scored token.
    ld_alpha : LD-DPO weighting of the sequence sums.
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
    kto_labels : [B] bool, desirable examples (KTO); kl_hidden / kl_labels (+ ref_kl_hidden or
        ref_kl_logps [B]) : the mismatched-pair batch of KTO's KL reference point.

    Returns
    -------
    :class:`prefkern.losses.PreferenceLossOutput` (loss, per-example losses, rewards, metrics).
    """

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
        **loss_kwargs: Any,
    ) -> None:
        super().__init__()
        if loss_type == "c3po":
            raise ValueError("c3po adds constraint terms on other prompts: compute its token log-probs with "
                             "prefkern.linear_logprobs and call prefkern.c3po_loss")
        self.family = _family(loss_type)
        self._params = frozenset(inspect.signature(self.family).parameters)
        if mode not in ("auto", "stream", "eager"):
            raise ValueError(f"mode must be 'auto', 'stream' or 'eager', got {mode!r}")
        if mode == "eager" and loss_type not in EAGER_LOSS_TYPES:
            raise ValueError(f"mode='eager' needs a loss that decomposes per pair ({sorted(EAGER_LOSS_TYPES)}); "
                             f"{loss_type!r} must stream")
        self._tensor_options = sorted(k for k, v in loss_kwargs.items() if isinstance(v, torch.Tensor))
        if mode == "eager" and self._tensor_options:
            raise ValueError(f"per-example options {self._tensor_options} are not split across eager chunks: "
                             "use mode='stream'")
        if mode == "eager" and empty_completions == "drop":
            raise ValueError("empty_completions='drop' changes the batch: use mode='stream'")
        if memory_budget is not None and memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        is_dpo = self.family is LOSS_REGISTRY["sigmoid"][0]
        if (average_log_prob or nll_weight) and not is_dpo:
            raise ValueError("average_log_prob and nll_weight apply to DPO-family losses; other families take their "
                             "own options (e.g. sft_weight for SimPO, cpo_alpha for CPO)")
        self.loss_type, self.beta, self.ignore_index = loss_type, beta, ignore_index
        self.average_log_prob, self.nll_weight = average_log_prob, nll_weight
        self.mode, self.memory_budget, self.shift, self.backend = mode, memory_budget, shift, backend
        self.empty_completions, self.ld_alpha = empty_completions, ld_alpha
        self.loss_kwargs = self._loss_kwargs(loss_kwargs)

    def _loss_kwargs(self, extra: Dict[str, Any]) -> Dict[str, Any]:
        kwargs = dict(extra)
        if self.beta is not None and "beta" in self._params:
            kwargs.setdefault("beta", self.beta)
        if self.loss_type == "rpo" or self.nll_weight:
            base = "sigmoid" if self.loss_type in ("rpo", "dpo") else self.loss_type
            kwargs["loss_type"] = [base, "sft"]
            kwargs["loss_weights"] = [1.0, self.nll_weight or extra.get("rpo_alpha", 1.0)]
        elif self.loss_type in LOSS_REGISTRY:
            kwargs.update(LOSS_REGISTRY[self.loss_type][1])
        return kwargs

    # ---- the loss on per-sequence values --------------------------------------------------------

    def _batch(self, token_logps, mask, ref_seq, ref_tokens):
        batch = preference_batch(token_logps, mask, ref_tokens, ld_alpha=self.ld_alpha,
                                 empty_completions=self.empty_completions)
        if ref_seq is not None:
            rc, rr = ref_seq
            if batch.kept is not None:
                rc, rr = rc[batch.kept], rr[batch.kept]
            batch = replace(batch, ref_chosen_logps=rc, ref_rejected_logps=rr)
        if self.average_log_prob:
            lc = batch.chosen_lengths.clamp(min=1)
            lr = batch.rejected_lengths.clamp(min=1)
            batch = replace(
                batch,
                policy_chosen_logps=batch.policy_chosen_logps / lc, policy_rejected_logps=batch.policy_rejected_logps / lr,
                ref_chosen_logps=None if batch.ref_chosen_logps is None else batch.ref_chosen_logps / lc,
                ref_rejected_logps=None if batch.ref_rejected_logps is None else batch.ref_rejected_logps / lr,
            )
        return batch

    def _paired_loss(self, batch: PreferenceBatch) -> PreferenceLossOutput:
        return self.family(**self._family_args(batch), **self.loss_kwargs)

    def _family_args(self, batch: PreferenceBatch) -> Dict[str, Any]:
        fields = {
            "policy_chosen_logps": batch.policy_chosen_logps, "policy_rejected_logps": batch.policy_rejected_logps,
            "ref_chosen_logps": batch.ref_chosen_logps, "ref_rejected_logps": batch.ref_rejected_logps,
            "chosen_lengths": batch.chosen_lengths, "rejected_lengths": batch.rejected_lengths,
            "chosen_nll": batch.chosen_nll,
        }
        args = {k: v for k, v in fields.items() if k in self._params}
        if "ref_chosen_logps" in self._params and args.get("ref_chosen_logps") is None and not self._reference_free():
            raise ValueError(f"loss_type {self.loss_type!r} needs reference log-probs: pass ref_hidden (+ ref_weight) "
                             "or ref_logps")
        return args

    def _reference_free(self) -> bool:
        return bool(self.loss_kwargs.get("reference_free")) or self.loss_type == "sft"

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
        ref_logps: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
        *,
        token_weights: Optional[torch.Tensor] = None,
        kto_labels: Optional[torch.Tensor] = None,
        kl_hidden: Optional[torch.Tensor] = None,
        kl_labels: Optional[torch.Tensor] = None,
        ref_kl_hidden: Optional[torch.Tensor] = None,
        ref_kl_logps: Optional[torch.Tensor] = None,
    ) -> PreferenceLossOutput:
        check_tensor("hidden", hidden)
        check_tensor("labels", labels)
        if hidden.dim() != 3:
            raise ValueError(f"hidden must have shape [2B, T, H] ([chosen; rejected]), got {tuple(hidden.shape)}")
        if tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"labels must have shape {tuple(hidden.shape[:2])} (hidden's [2B, T]), got {tuple(labels.shape)}")
        if ref_hidden is not None and ref_logps is not None:
            raise ValueError("pass either ref_hidden (a reference model) or ref_logps (precomputed), not both")
        labels = shift_labels(labels, self.shift, self.ignore_index)
        mask = labels != self.ignore_index
        if self.loss_type in ("kto", "apo_zero_unpaired"):
            return self._kto(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, kto_labels,
                             kl_hidden, kl_labels, ref_kl_hidden, ref_kl_logps)
        if hidden.shape[0] % 2 != 0 or hidden.shape[0] == 0:
            raise ValueError(f"hidden must stack [chosen; rejected] along a non-zero even first dim, got {tuple(hidden.shape)}")
        ref_seq, ref_tokens = self._reference(ref_hidden, ref_weight if ref_weight is not None else weight,
                                              ref_bias if ref_weight is not None else bias, labels, ref_logps, mask)
        if self.loss_type == "salt":
            return self._salt(hidden, weight, labels, bias, token_weights, mask)
        if self._use_eager(hidden, weight, bias):
            return self._eager(hidden, weight, labels, bias, mask, ref_seq, ref_tokens)
        token_logps = linear_logprobs(hidden, weight, labels, bias, ignore_index=self.ignore_index,
                                      backend=self.backend)
        return self._paired_loss(self._batch(token_logps, mask, ref_seq, ref_tokens))

    def _logps(self, hidden, weight, labels, bias):
        return linear_logprobs(hidden, weight, labels, bias, ignore_index=self.ignore_index, backend=self.backend)

    def _reference(self, ref_hidden, ref_weight, ref_bias, labels, ref_logps, mask):
        """(per-sequence (chosen, rejected) or None, token-level [2B, T] or None), detached."""
        if ref_hidden is not None:
            if tuple(ref_hidden.shape[:2]) != tuple(labels.shape):
                raise ValueError(f"ref_hidden must have shape [2B, T, H'] with [2B, T] = {tuple(labels.shape)}, "
                                 f"got {tuple(ref_hidden.shape)}")
            with torch.no_grad():
                return None, self._logps(ref_hidden, ref_weight, labels, ref_bias)
        if ref_logps is None:
            return None, None
        if isinstance(ref_logps, (tuple, list)):
            rc, rr = ref_logps
            return (rc.detach().float(), rr.detach().float()), None
        check_tensor("ref_logps", ref_logps)
        b2 = labels.shape[0]
        if tuple(ref_logps.shape) == (b2,):
            return (ref_logps[: b2 // 2].detach().float(), ref_logps[b2 // 2:].detach().float()), None
        if tuple(ref_logps.shape) == tuple(labels.shape):
            return None, ref_logps.detach().float()
        raise ValueError(f"ref_logps must have shape [2B] = [{b2}] (per sequence) or [2B, T] = "
                         f"{list(labels.shape)} (per token), got {tuple(ref_logps.shape)}")

    def _use_eager(self, hidden, weight, bias, rows_per_unit: int = 2) -> bool:
        if (self.mode == "stream" or self.loss_type not in EAGER_LOSS_TYPES or self.empty_completions == "drop"
                or self._tensor_options):
            return False
        if not eager_applies(hidden, weight, bias, self.backend, "FusedLinearPreferenceLoss"):
            return False
        return self.mode == "eager" or pair_fits(hidden.shape[1], weight.shape[0], self.memory_budget, hidden.device,
                                                 rows_per_unit)

    # ---- eager: gradients inside forward ------------------------------------------------------------

    def _eager(self, hidden, weight, labels, bias, mask, ref_seq, ref_tokens) -> PreferenceLossOutput:
        b = hidden.shape[0] // 2
        total_chosen = mask[:b].sum().clamp(min=1).to(torch.float32)

        def chunk_share(leaf, rows, s, e):
            c = e - s
            batch = self._batch(leaf, mask[rows], self._slice_ref(ref_seq, s, e),
                                None if ref_tokens is None else ref_tokens[rows])
            # the chunk's share of the batch's token-mean NLL, rescaled because the chunk loss is averaged over c pairs
            chunk_nll = -(leaf[:c] * mask[rows][:c]).sum() / total_chosen * (b / c)
            return self._paired_loss(replace(batch, chosen_nll=chunk_nll)).loss * (c / b)

        token_logps, grads = eager_chunks(hidden, weight, bias, labels, self.ignore_index, chunk_share,
                                          backend=self.backend, memory_budget=self.memory_budget)
        out = self._paired_loss(self._batch(token_logps, mask, ref_seq, ref_tokens))
        return replace(out, loss=with_gradients(out.loss, hidden, weight, bias, grads))

    @staticmethod
    def _slice_ref(ref_seq, s, e):
        return None if ref_seq is None else (ref_seq[0][s:e], ref_seq[1][s:e])

    # ---- token-level and unpaired losses ----------------------------------------------------------------

    def _salt(self, hidden, weight, labels, bias, token_weights, mask) -> PreferenceLossOutput:
        if token_weights is None or tuple(token_weights.shape) != tuple(labels.shape):
            raise ValueError(f"loss_type 'salt' needs token_weights of shape {tuple(labels.shape)} ([edited; generated])")
        token_logps = self._logps(hidden, weight, labels, bias)
        b = labels.shape[0] // 2
        kwargs = dict(self.loss_kwargs)
        kwargs.setdefault("vocab_size", weight.shape[0])
        w = token_weights * mask
        return self.family(token_logps[:b], w[:b], token_logps[b:], w[b:], **kwargs)

    def _kto(self, hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, kto_labels,
             kl_hidden, kl_labels, ref_kl_hidden, ref_kl_logps) -> PreferenceLossOutput:
        if kto_labels is None or tuple(kto_labels.shape) != (hidden.shape[0],):
            raise ValueError(f"KTO needs kto_labels of shape [B] = [{hidden.shape[0]}] (True = desirable)")
        rw = ref_weight if ref_weight is not None else weight
        rb = ref_bias if ref_weight is not None else bias
        mask = labels != self.ignore_index
        with torch.no_grad():
            if ref_hidden is not None:
                ref = (self._logps(ref_hidden, rw, labels, rb) * mask).sum(-1)
            elif ref_logps is not None and tuple(ref_logps.shape) == (hidden.shape[0],):
                ref = ref_logps.detach().float()
            else:
                raise ValueError("KTO needs ref_hidden or ref_logps of shape [B]")
        kl_kwargs = {}
        if kl_hidden is not None:
            if kl_labels is None:
                raise ValueError("kl_hidden needs kl_labels")
            kl_labels = shift_labels(kl_labels, self.shift, self.ignore_index)
            kl_mask = kl_labels != self.ignore_index
            with torch.no_grad():
                kl_kwargs["kl_policy_logps"] = (self._logps(kl_hidden, weight, kl_labels, bias) * kl_mask).sum(-1)
                if ref_kl_hidden is not None:
                    kl_kwargs["kl_ref_logps"] = (self._logps(ref_kl_hidden, rw, kl_labels, rb) * kl_mask).sum(-1)
                elif ref_kl_logps is not None:
                    kl_kwargs["kl_ref_logps"] = ref_kl_logps.detach().float()
                else:
                    raise ValueError("kl_hidden needs ref_kl_hidden or ref_kl_logps")
        if not self._use_eager(hidden, weight, bias, rows_per_unit=1):
            policy = (self._logps(hidden, weight, labels, bias) * mask).sum(-1)
            return self.family(policy, ref, kto_labels, **kl_kwargs, **self.loss_kwargs)
        # eager: a dry run on placeholder log-probs raises input errors before any GEMM and gives z0, the KL
        # reference point every chunk shares; the loss is then a mean of per-example terms
        quiet = {**self.loss_kwargs, "warn_imbalance": False}
        with torch.no_grad():
            z0 = self.family(torch.zeros_like(ref), ref, kto_labels, **kl_kwargs, **quiet).metrics["kl"]
        chunk_kwargs = {**quiet, "kl": z0}
        desirable = kto_labels if kto_labels.dtype == torch.bool else kto_labels != 0
        n = hidden.shape[0]

        def chunk_share(leaf, rows, s, e):
            policy = (leaf * mask[rows]).sum(-1)
            return self.family(policy, ref[rows], desirable[rows], **chunk_kwargs).loss * ((e - s) / n)

        token_logps, grads = eager_chunks(hidden, weight, bias, labels, self.ignore_index, chunk_share, paired=False,
                                          backend=self.backend, memory_budget=self.memory_budget)
        out = self.family((token_logps * mask).sum(-1), ref, kto_labels, **kl_kwargs, **self.loss_kwargs)
        return replace(out, loss=with_gradients(out.loss, hidden, weight, bias, grads))


def matmul_units(mode: str, with_reference: bool) -> int:
    """Matmul units (2 N H V FLOPs each) of one training step of the policy, plus the reference pass."""
    return (3 if mode == "eager" else 4) + (1 if with_reference else 0)


__all__ = ["FusedLinearPreferenceLoss", "EAGER_LOSS_TYPES", "default_memory_budget", "matmul_units"]
