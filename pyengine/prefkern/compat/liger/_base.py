"""What every Liger-compatible class shares: constructor fields, input checks, the engine call, the aux outputs."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..._validation import check_flag, check_ignore_index, check_integer, check_lm_head, check_number, check_tensor
from ...fused.engine import EngineOptions, FusedResult, fused_loss, token_logps_no_grad
from ...fused.objective import BatchObjective, CatalogObjective, empty_rows
from ...losses import chosen_nll, sequence_logps

LigerOutput = Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]

EMPTY_ROWS = ("target rows {rows} have no scored token (all ignore_index): {why} divides by the completion length "
              "(Liger gives 0/0 = NaN); drop empty completions first")


def empty_rows_message(why: str) -> str:
    return EMPTY_ROWS.replace("{why}", why)


def check_scored(mask: torch.Tensor, why: str) -> None:
    """ValueError naming ``target`` when a row has no scored token and the loss divides by its length."""
    rows = empty_rows(mask)
    if rows:
        raise ValueError(EMPTY_ROWS.format(rows=rows, why=why))


class LigerLoss(nn.Module):
    """The constructor fields Liger's classes share (``alpha`` and ``compute_nll_loss`` where the class has them).

    ``compiled`` and ``chunk_size`` tune Liger's implementation only: validated, stored, not used.
    """

    def __init__(self, ignore_index: int, beta: float, compiled: bool, chunk_size: int, *, positive_beta: bool,
                 alpha: Optional[float] = None, compute_nll_loss: Optional[bool] = None) -> None:
        super().__init__()
        self.ignore_index = check_ignore_index(ignore_index)
        if positive_beta:
            self.beta = check_number("beta", beta, low=0.0, low_open=True)
        else:
            self.beta = check_number("beta", beta)
        self.compiled = check_flag("compiled", compiled)
        self.chunk_size = check_integer("chunk_size", chunk_size, low=1)
        if alpha is not None:
            self.alpha = check_number("alpha", alpha)
        if compute_nll_loss is not None:
            self.compute_nll_loss = check_flag("compute_nll_loss", compute_nll_loss)

    @property
    def engine_options(self) -> EngineOptions:
        return EngineOptions(ignore_index=self.ignore_index, op="compat.liger")

    def inputs(self, _input: object, lin_weight: object, target: object, bias: object, *,
               paired: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checks with Liger's argument names; returns (hidden, weight, int64 target)."""
        layout = "[2B, T, H] ([chosen; rejected])" if paired else "[B, T, H]"
        if check_tensor("_input", _input).dim() != 3:
            raise ValueError(f"_input must have shape {layout}, got {tuple(_input.shape)}")
        check_lm_head(_input, lin_weight, target, bias, names=("_input", "lin_weight", "target", "bias"),
                      hidden_shape=layout)
        if _input.shape[0] == 0 or (paired and _input.shape[0] % 2 != 0):
            what = "a non-zero even first dim (chosen rows, then rejected rows)" if paired else "at least one row"
            raise ValueError(f"_input must have {what}, got shape {tuple(_input.shape)}")
        return _input, lin_weight, target.to(torch.int64)

    def paired_inputs(self, lin_weight: object, _input: object, target: object,
                      bias: object) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden [2B, T, H], weight, int64 target [2B, T], scored mask [2B, T]) of a paired batch."""
        hidden, weight, target = self.inputs(_input, lin_weight, target, bias, paired=True)
        return hidden, weight, target, target != self.ignore_index

    def nll_weight(self) -> float:
        return self.alpha if self.compute_nll_loss else 0.0

    def reported_nll(self, token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The aux ``nll_loss``: the chosen half's token-mean NLL when it is computed, else 0."""
        b = mask.shape[0] // 2
        if not self.compute_nll_loss:
            return token_logps.new_zeros(())
        return chosen_nll(token_logps[:b], mask[:b])

    def check_nll(self, mask: torch.Tensor) -> None:
        """The chosen half's NLL is undefined without a scored chosen token: refused before any GEMM."""
        if self.compute_nll_loss:
            b = mask.shape[0] // 2
            chosen_nll(-mask[:b].to(torch.float32), mask[:b])

    def paired_loss(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    target: torch.Tensor, mask: torch.Tensor, loss_type: str, options: dict, *,
                    average_log_prob: bool = False, reported_average: Optional[bool] = None,
                    ref_seq: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, empty_rows_why: Optional[str] = None,
                    chosen_nll: Optional[torch.Tensor] = None, add_nll: bool = True,
                    metrics: Tuple[str, ...] = ()) -> LigerOutput:
        """The catalog's ``loss_type`` on the engine, with Liger's NLL term and paired aux outputs.

        ``average_log_prob``: the loss sees length-averaged log-probs; ``reported_average``: the aux log-probs are
        averaged (default: as the loss sees them); ``empty_rows_why``: a row without a scored token is refused,
        naming why; ``chosen_nll``: replaces the NLL (0 or an NLL over other labels; None: the chosen half's,
        checked before any GEMM when it is computed); ``add_nll``: ``alpha`` x the NLL is added to the loss (off for
        ORPO, whose loss holds the NLL itself); ``metrics``: output metrics appended to the aux tuple.
        """
        if chosen_nll is None:
            self.check_nll(mask)
        objective = CatalogObjective(
            loss_type, options, mask, ref_seq=ref_seq, average_log_prob=average_log_prob, empty_completions="keep",
            nll_weight=self.nll_weight() if add_nll else 0.0, chosen_nll=chosen_nll,
            empty_rows_message=None if empty_rows_why is None else empty_rows_message(empty_rows_why))
        res = self.run(hidden, weight, bias, target, objective)
        average = average_log_prob if reported_average is None else reported_average
        seq = sequence_logps(res.token_logps, mask, average=average)
        nll = self.reported_nll(res.token_logps, mask) if chosen_nll is None else chosen_nll
        out = res.output
        return out.loss, self.paired_aux(hidden, weight, bias, seq, nll, out, *(out.metrics[k] for k in metrics))

    def paired_aux(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   seq_logps: torch.Tensor, nll: torch.Tensor, out, *extra: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Liger's paired aux tuple: (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
        nll_loss, chosen_rewards, rejected_rewards, *extra), detached."""
        chosen, rejected = split_pairs(seq_logps)
        means = logits_means(hidden, weight, bias, hidden.shape[0] // 2)
        return detached(chosen, rejected, *means, nll, out.chosen_rewards, out.rejected_rewards, *extra)

    def run(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
            objective: BatchObjective) -> FusedResult:
        return fused_loss(hidden, weight, bias, target, objective, self.engine_options)

    def reference_logps(self, ref_input: object, ref_weight: object, ref_bias: object, lin_weight: torch.Tensor,
                        bias: Optional[torch.Tensor], target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[N]`` reference sequence log-prob sums, computed without gradient; the head defaults to the policy's."""
        if ref_input is None:
            raise ValueError("ref_input is required when use_ref_model=True (the reference model's hidden states, "
                             "shaped like _input); pass use_ref_model=False for a reference-free loss")
        check_tensor("ref_input", ref_input)
        if ref_input.dim() != 3 or tuple(ref_input.shape[:2]) != tuple(target.shape):
            raise ValueError(f"ref_input must have shape [N, T, H'] with [N, T] = {tuple(target.shape)} (target's "
                             f"shape), got {tuple(ref_input.shape)}")
        if ref_weight is None:
            ref_weight = lin_weight
            if ref_bias is None:
                ref_bias = bias
        check_lm_head(ref_input, ref_weight, target, ref_bias, names=("ref_input", "ref_weight", "target", "ref_bias"))
        tok = token_logps_no_grad(ref_input, ref_weight, ref_bias, target, self.ignore_index, "auto")
        return sequence_logps(tok, mask)


def row_logit_sums(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``[N]`` fp64: ``sum_{t, v} (x_nt . W_v + b_v)`` for every row n, without the logits.

    ``sum_t x_nt`` is accumulated in fp32 (bf16/fp16 are upcast inside the reduction), the dot with
    ``sum_v W_v`` in fp64.
    """
    with torch.no_grad():
        rows = hidden.detach().sum(dim=1, dtype=torch.float32).to(torch.float64)
        cols = weight.detach().sum(dim=0, dtype=torch.float32).to(torch.float64)
        sums = rows @ cols
        if bias is not None:
            sums = sums + hidden.shape[1] * bias.detach().sum(dtype=torch.float32).to(torch.float64)
        return sums


def logits_means(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Liger's ``chosen_logits_mean`` / ``rejected_logits_mean``: means over all ``B x T x V`` logits of each half."""
    sums = row_logit_sums(hidden, weight, bias)
    denom = float(b * hidden.shape[1] * weight.shape[0])
    return (sums[:b].sum() / denom).to(torch.float32), (sums[b:].sum() / denom).to(torch.float32)


def detached(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return tuple(t.detach() for t in tensors)


def split_pairs(per_row: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    b = per_row.shape[0] // 2
    return per_row[:b], per_row[b:]


__all__ = ["LigerLoss", "LigerOutput", "EMPTY_ROWS", "check_scored", "empty_rows_message", "detached", "logits_means", "row_logit_sums",
           "split_pairs"]
