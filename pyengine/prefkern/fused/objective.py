"""What the fused engine optimises: a loss over token log-probs, and how a chunk of the batch gets its share.

A :class:`BatchObjective` is bound to one call's batch (mask, reference log-probs, labels of KTO). The engine hands it
token log-probs and asks for

- :meth:`~BatchObjective.evaluate`: the loss output of the whole batch (stream mode, and the reported values in eager
  mode);
- :meth:`~BatchObjective.chunk_share`: the share of the batch loss of pairs ``s..e-1`` (examples, when unpaired), whose
  gradient the eager pass takes inside forward; the batch loss must be the sum of the shares;
- :meth:`~BatchObjective.check`: input errors raised before any GEMM (a dry run on placeholder log-probs).

:class:`CatalogObjective` serves every paired loss of the catalog through :func:`prefkern.preference_loss`;
:class:`CatalogUnpairedObjective` serves KTO and APO-zero-unpaired.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from .._validation import values_readable
from ..losses import PreferenceBatch, PreferenceLossOutput, preference_batch, preference_loss
from ..losses.registry import loss_entry

SequenceLogps = Tuple[torch.Tensor, torch.Tensor]  # (chosen [B], rejected [B])


class BatchObjective:
    """Interface the engine calls; ``unpaired``: rows are examples, not ``[chosen; rejected]`` pairs;
    ``per_pair``: the batch loss is a sum of chunk shares (eager mode applies)."""

    unpaired: bool = False
    per_pair: bool = True

    def check(self) -> None:
        raise NotImplementedError

    def chunk_share(self, token_logps: torch.Tensor, rows: torch.Tensor, s: int, e: int) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, token_logps: torch.Tensor) -> PreferenceLossOutput:
        raise NotImplementedError


def empty_rows(mask: torch.Tensor) -> list:
    return (~mask.any(dim=1)).nonzero().flatten().tolist()


class CatalogObjective(BatchObjective):
    """A paired catalog loss (``loss_type`` of :func:`prefkern.preference_loss`) on ``[chosen; rejected]`` rows.

    Parameters
    ----------
    loss_type : a catalog name, ``"rpo"`` or a list of DPO types; kwargs : the family's options.
    mask : [2B, T] bool, the scored positions.
    ref_seq : (chosen [B], rejected [B]) reference sequence log-probs (sums), or None.
    ref_tokens : [2B, T] reference token log-probs, or None.
    average_log_prob : policy and reference sequence log-probs divided by the completion lengths.
    ld_alpha : LD-DPO weighting of the sums; empty_completions : as :func:`prefkern.losses.preference_batch`.
    nll_weight : adds ``nll_weight`` x the chosen token-mean NLL to the loss (Liger's ``alpha``).
    chosen_nll : replaces the batch's chosen NLL (a 0-d tensor, e.g. 0 or an NLL over other labels).
    empty_rows_message : raise ``ValueError(empty_rows_message.format(rows=...))`` when a row has no scored token.
    """

    def __init__(self, loss_type: Union[str, Sequence[str]], kwargs: Dict[str, Any], mask: torch.Tensor, *,
                 ref_seq: Optional[SequenceLogps] = None, ref_tokens: Optional[torch.Tensor] = None,
                 average_log_prob: bool = False, ld_alpha: Optional[float] = None, empty_completions: str = "raise",
                 nll_weight: float = 0.0, chosen_nll: Optional[torch.Tensor] = None,
                 empty_rows_message: Optional[str] = None) -> None:
        self.loss_type, self.kwargs = loss_type, dict(kwargs)
        entry = loss_entry(loss_type, dict(kwargs))
        self.mask, self.ref_seq, self.ref_tokens = mask, ref_seq, ref_tokens
        self.average_log_prob, self.ld_alpha, self.empty_completions = average_log_prob, ld_alpha, empty_completions
        self.nll_weight, self.chosen_nll, self.empty_rows_message = nll_weight, chosen_nll, empty_rows_message
        self.b = mask.shape[0] // 2
        tensor_options = any(isinstance(v, torch.Tensor) for v in kwargs.values())
        self.per_pair = (entry.per_pair and not tensor_options and empty_completions != "drop"
                         and (chosen_nll is None or not chosen_nll.requires_grad))
        self.chosen_tokens = mask[: self.b].sum().clamp(min=1).to(torch.float32)

    # ---- batch preparation --------------------------------------------------------------------------------

    def _sequence_batch(self, token_logps: torch.Tensor, mask: torch.Tensor, ref_seq: Optional[SequenceLogps],
               ref_tokens: Optional[torch.Tensor]) -> PreferenceBatch:
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

    def _loss(self, batch: PreferenceBatch) -> PreferenceLossOutput:
        out = preference_loss(self.loss_type, batch=batch, **self.kwargs)
        if self.nll_weight:
            out = replace(out, loss=out.loss + self.nll_weight * batch.chosen_nll)
        return out

    # ---- the engine's interface ---------------------------------------------------------------------------

    def check(self) -> None:
        with torch.no_grad():
            self.evaluate(-self.mask.to(torch.float32))

    def evaluate(self, token_logps: torch.Tensor) -> PreferenceLossOutput:
        if self.empty_rows_message is not None and values_readable(self.mask):
            rows = empty_rows(self.mask)
            if rows:
                raise ValueError(self.empty_rows_message.format(rows=rows))
        batch = self._sequence_batch(token_logps, self.mask, self.ref_seq, self.ref_tokens)
        if self.chosen_nll is not None:
            batch = replace(batch, chosen_nll=self.chosen_nll)
        elif batch.chosen_nll is None:
            batch = replace(batch, chosen_nll=token_logps.new_zeros(()))
        return self._loss(batch)

    def chunk_share(self, token_logps: torch.Tensor, rows: torch.Tensor, s: int, e: int) -> torch.Tensor:
        c = e - s
        ref_seq = None if self.ref_seq is None else (self.ref_seq[0][s:e], self.ref_seq[1][s:e])
        ref_tokens = None if self.ref_tokens is None else self.ref_tokens[rows]
        mask = self.mask[rows]
        batch = self._sequence_batch(token_logps, mask, ref_seq, ref_tokens)
        if self.chosen_nll is not None:
            nll = self.chosen_nll  # a constant: each chunk's c / b share of it sums to it
        else:
            # the chunk's share of the batch's token-mean NLL, rescaled because the chunk loss is averaged over c
            nll = -(token_logps[:c] * mask[:c]).sum() / self.chosen_tokens * (self.b / c)
        return self._loss(replace(batch, chosen_nll=nll)).loss * (c / self.b)


class CatalogUnpairedObjective(BatchObjective):
    """KTO / APO-zero-unpaired of the catalog on ``[B, T]`` example rows.

    ``ref`` [B] reference sequence log-probs, ``desirable`` [B] bool, ``kl_kwargs`` the KL reference point's
    inputs of :func:`prefkern.losses.kto_loss` (``kl_policy_logps`` / ``kl_ref_logps``). The reference point
    ``z0`` depends on the whole batch but carries no gradient: :meth:`check` computes it once and every chunk
    shares it.
    """

    unpaired = True

    def __init__(self, loss_type: str, kwargs: Dict[str, Any], mask: torch.Tensor, ref: torch.Tensor,
                 desirable: torch.Tensor, kl_kwargs: Dict[str, torch.Tensor]) -> None:
        self.family = loss_entry(loss_type).fn
        self.kwargs = {**kwargs, **loss_entry(loss_type).fixed}
        self.mask, self.ref, self.desirable, self.kl_kwargs = mask, ref, desirable, kl_kwargs
        self.per_pair = not any(isinstance(v, torch.Tensor) for v in kwargs.values())
        self.z0: Optional[torch.Tensor] = None

    def check(self) -> None:
        quiet = {**self.kwargs, "warn_imbalance": False}
        with torch.no_grad():
            out = self.family(torch.zeros_like(self.ref), self.ref, self.desirable, **self.kl_kwargs, **quiet)
        self.z0 = out.metrics["kl"]

    def evaluate(self, token_logps: torch.Tensor) -> PreferenceLossOutput:
        policy = (token_logps * self.mask).sum(-1)
        return self.family(policy, self.ref, self.desirable, **self.kl_kwargs, **self.kwargs)

    def chunk_share(self, token_logps: torch.Tensor, rows: torch.Tensor, s: int, e: int) -> torch.Tensor:
        desirable = self.desirable if self.desirable.dtype == torch.bool else self.desirable != 0
        policy = (token_logps * self.mask[rows]).sum(-1)
        kwargs = {**self.kwargs, "warn_imbalance": False, "kl": self.z0}
        out = self.family(policy, self.ref[rows], desirable[rows], **kwargs)
        return out.loss * ((e - s) / self.mask.shape[0])


__all__ = ["BatchObjective", "CatalogObjective", "CatalogUnpairedObjective", "empty_rows"]
