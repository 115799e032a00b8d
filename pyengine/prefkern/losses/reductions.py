"""Sequence reductions of token log-probs ``[B, T]`` + completion mask.

Layout conventions
------------------
* ``token_logps[b, t]`` is ``log pi(y_t | x, y_<t)`` already aligned with the
  label at position ``t`` (the caller shifts logits by one, or the kernel does).
* ``mask[b, t]`` is 1 (or ``True``) on scored completion tokens and 0 on prompt
  and padding. Masked positions never contribute, even if they hold ``-inf``/NaN.
* A paired batch is stacked ``[chosen; rejected]`` along dim 0: rows ``0..B-1``
  are the chosen completions and rows ``B..2B-1`` the rejected ones of the same
  prompts (TRL's ``concatenated_forward`` layout).

bf16/fp16 inputs are upcast to float32 before any accumulation; float64 stays
float64.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .._validation import check_finite, check_floating, check_positive_lengths, compute_dtype, values_readable
from .outputs import PreferenceBatch

__all__ = [
    "sequence_lengths",
    "sequence_logps",
    "split_chosen_rejected",
    "concat_chosen_rejected",
    "chosen_nll",
    "log1mexp",
    "ld_sequence_logps",
    "wpo_sequence_weights",
    "preference_batch",
]


def _check_token_inputs(token_logps: object, mask: object, name: str = "token_logps") -> Tuple[torch.Tensor, torch.Tensor]:
    token_logps = check_floating(name, token_logps)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask for {name} must be a torch.Tensor of shape [B, T], got {type(mask).__name__}")
    if token_logps.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got {tuple(token_logps.shape)}")
    if mask.shape != token_logps.shape:
        raise ValueError(f"mask must have the shape of {name} {tuple(token_logps.shape)}, got {tuple(mask.shape)}")
    if mask.device != token_logps.device:
        raise ValueError(f"mask is on {mask.device} but {name} is on {token_logps.device}")
    if token_logps.shape[0] == 0:
        raise ValueError(f"{name} is empty (B=0); a loss needs at least one sequence")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            bad = ~((mask == 0) | (mask == 1))
            if values_readable(mask) and bad.any():
                raise ValueError("mask must contain only 0 and 1")
        mask = mask != 0
    check_finite(name, token_logps, where=mask)
    return token_logps, mask


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(compute_dtype(x))


def sequence_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Number of scored completion tokens per row.

    Parameters
    ----------
    mask : torch.Tensor
        ``[B, T]`` bool or 0/1 completion mask.

    Returns
    -------
    torch.Tensor
        ``[B]`` int64 token counts ``|y| = sum_t m_t``.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape [B, T], got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, T], got {tuple(mask.shape)}")
    return (mask != 0).sum(dim=1)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Summed (or length-averaged) sequence log-prob.

    Parameters
    ----------
    token_logps : torch.Tensor
        ``[B, T]`` token log-probs (any float dtype; bf16/fp16 accumulate in fp32).
    mask : torch.Tensor
        ``[B, T]`` completion mask (bool or 0/1).
    average : bool, default False
        If True return ``S / |y|`` (SimPO/ORPO/CPO-ipo style); a row with no
        completion token raises ``ValueError`` instead of giving 0/0 = NaN.

    Returns
    -------
    torch.Tensor
        ``[B]`` float32 (float64 for float64 input).
    """
    token_logps, mask = _check_token_inputs(token_logps, mask)
    x = _upcast(token_logps)
    s = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)
    if average:
        n = mask.sum(dim=1)
        check_positive_lengths("mask", n, "sequence_logps(average=True)")
        s = s / n.to(s.dtype)
    return s


def split_chosen_rejected(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a ``[chosen; rejected]`` stacked tensor ``[2B, ...]`` into two ``[B, ...]`` halves."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [2B, ...], got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] % 2 != 0 or x.shape[0] == 0:
        raise ValueError(f"x must have an even, non-zero first dimension [2B, ...] ([chosen; rejected]), got {tuple(x.shape)}")
    b = x.shape[0] // 2
    return x[:b], x[b:]


def concat_chosen_rejected(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Stack ``chosen [B, ...]`` and ``rejected [B, ...]`` into ``[2B, ...]`` (TRL layout)."""
    for n, t in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must have the same shape")
    return torch.cat([chosen, rejected], dim=0)


def chosen_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL over every completion token of the given (chosen) rows.

    ``NLL = -sum_{b,t} m_bt l_bt / sum_{b,t} m_bt`` -- a token-weighted mean over
    the batch (PyTorch cross-entropy with ``reduction="mean"``), not a mean of
    per-sequence means. Pass only the chosen rows (``split_chosen_rejected``).

    Parameters
    ----------
    token_logps : torch.Tensor
        ``[B, T]`` token log-probs of the chosen completions.
    mask : torch.Tensor
        ``[B, T]`` completion mask.

    Returns
    -------
    torch.Tensor
        0-d NLL. Raises ``ValueError`` if the mask selects no token.
    """
    token_logps, mask = _check_token_inputs(token_logps, mask)
    x = _upcast(token_logps)
    n = mask.sum()
    if values_readable(mask) and int(n) == 0:
        raise ValueError("mask selects no completion token: the token-mean NLL is undefined (0/0)")
    return -torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / n.to(x.dtype)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, computed stably.

    Uses ``log(-expm1(x))`` for ``x > -ln 2`` and ``log1p(-exp(x))`` otherwise
    (Maechler's branch, as TRL's ORPO). ``x == 0`` gives ``-inf``. The unused
    branch is evaluated on a safe value so gradients never pick up NaN.

    Parameters
    ----------
    x : torch.Tensor
        Any shape, floating, ``<= 0``.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``.
    """
    x = check_floating("x", x)
    if values_readable(x) and (x.detach() > 0).any():
        raise ValueError("log1mexp needs x <= 0 (a log-probability); got a positive value")
    small = x < -math.log(2.0)
    x_near = torch.where(small, torch.full_like(x, -1.0), x)
    x_far = torch.where(small, x, torch.full_like(x, -1.0))
    return torch.where(small, torch.log1p(-torch.exp(x_far)), torch.log(-torch.expm1(x_near)))


def ld_sequence_logps(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    ld_alpha: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO length-desensitised sums (LOSSES.md A.7, TRL >= 0.29 semantics).

    With the public length ``l_p = min(|y_w|, |y_l|)`` and completion positions
    counted ``1..|y|`` by the cumulative mask,
    ``S_hat = sum_{t <= l_p} l(t) + ld_alpha * sum_{t > l_p} l(t)``.
    Apply it to the policy **and** the reference token log-probs (>= 0.29); TRL
    <= 0.28 applied it to the policy only (call it on the policy only to mimic).

    Parameters
    ----------
    chosen_token_logps, rejected_token_logps : torch.Tensor
        ``[B, T]`` token log-probs (the two halves of a ``[chosen; rejected]`` batch).
    chosen_mask, rejected_mask : torch.Tensor
        ``[B, T]`` completion masks.
    ld_alpha : float
        In ``[0, 1]``; 1 recovers the plain sums, 0 truncates to the common length.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``[B]`` weighted sums for chosen and rejected.
    """
    from .._validation import check_number

    alpha = check_number("ld_alpha", ld_alpha, low=0.0, high=1.0)
    c, cm = _check_token_inputs(chosen_token_logps, chosen_mask, "chosen_token_logps")
    r, rm = _check_token_inputs(rejected_token_logps, rejected_mask, "rejected_token_logps")
    if c.shape[0] != r.shape[0]:
        raise ValueError(f"chosen_token_logps has B={c.shape[0]} but rejected_token_logps has B={r.shape[0]}")
    dt = compute_dtype(c, r)
    c, r = c.to(dt), r.to(dt)
    public = torch.minimum(cm.sum(1), rm.sum(1)).unsqueeze(1)

    def weighted(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        pos = torch.cumsum(m.to(torch.int64), dim=1)
        w = torch.where(pos <= public, torch.ones((), dtype=dt), torch.full((), alpha, dtype=dt)).to(x.device)
        return torch.where(m, x * w, torch.zeros((), dtype=dt, device=x.device)).sum(1)

    return weighted(c, cm), weighted(r, rm)


@torch.no_grad()
def wpo_sequence_weights(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO per-sequence weights (LOSSES.md A.5), computed without gradient.

    ``w(y) = exp( mean_{t in y} [ l(t) - log sum_v p_t(v)^2 ] )`` with
    ``log sum_v p^2 = logsumexp(2z) - 2 logsumexp(z)`` on the logits ``z``.
    The DPO pair weight is ``w(y_w) * w(y_l)`` (see ``dpo_loss(chosen_weights=,
    rejected_weights=)``).

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` logits aligned with ``labels`` (already shifted).
    labels : torch.Tensor
        ``[B, T]`` int64 token ids (any value where ``mask`` is 0).
    mask : torch.Tensor
        ``[B, T]`` completion mask.

    Returns
    -------
    torch.Tensor
        ``[B]`` float32 (float64 for float64 logits) weights, detached.
    """
    logits = check_floating("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, T, V], got {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError("labels must be an int64/int32 tensor of shape [B, T]")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    z = _upcast(logits)
    dummy = torch.zeros_like(z[..., 0])
    _, m = _check_token_inputs(dummy, mask, "logits")
    safe = torch.where(m, labels.to(torch.int64), torch.zeros_like(labels, dtype=torch.int64))
    lse = torch.logsumexp(z, dim=-1)
    tok = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    log_sq = torch.logsumexp(2 * z, dim=-1) - 2 * lse
    n = m.sum(1)
    check_positive_lengths("mask", n, "wpo_sequence_weights")
    val = torch.where(m, tok - log_sq, torch.zeros((), dtype=z.dtype, device=z.device)).sum(1) / n.to(z.dtype)
    return torch.exp(val)


def preference_batch(
    policy_token_logps: torch.Tensor,
    mask: torch.Tensor,
    ref_token_logps: Optional[torch.Tensor] = None,
    *,
    ref_mask: Optional[torch.Tensor] = None,
    ld_alpha: Optional[float] = None,
    empty_completions: str = "raise",
) -> PreferenceBatch:
    """Per-sequence inputs of every loss from a ``[chosen; rejected]`` token batch.

    Parameters
    ----------
    policy_token_logps : torch.Tensor
        ``[2B, T]`` policy token log-probs, rows ``0..B-1`` chosen, ``B..2B-1`` rejected.
    mask : torch.Tensor
        ``[2B, T]`` completion mask.
    ref_token_logps : torch.Tensor, optional
        ``[2B, T']`` reference token log-probs (detached inside), same layout.
    ref_mask : torch.Tensor, optional
        Mask for ``ref_token_logps``; defaults to ``mask``.
    ld_alpha : float, optional
        If given, the sums are LD-DPO weighted (policy and reference, >= 0.29).
    empty_completions : {"raise", "drop", "keep"}, default "raise"
        What to do with a pair whose chosen or rejected completion has no scored
        token: ``"raise"`` a ``ValueError``; ``"drop"`` the pair (TRL >= 0.29
        behaviour since PR #6321; ``PreferenceBatch.kept`` lists the kept pair
        indices); ``"keep"`` it with a summed log-prob of 0.

    Returns
    -------
    PreferenceBatch
        Summed log-probs ``[B]``, completion lengths ``[B]`` (int64) and the
        chosen token-mean NLL (0-d; ``None`` if the chosen rows are all empty).
    """
    if empty_completions not in ("raise", "drop", "keep"):
        raise ValueError(f"empty_completions must be 'raise', 'drop' or 'keep', got {empty_completions!r}")
    policy_token_logps, m = _check_token_inputs(policy_token_logps, mask, "policy_token_logps")
    pc_t, pr_t = split_chosen_rejected(policy_token_logps)
    mc, mr = split_chosen_rejected(m)
    kept = None
    if empty_completions != "keep" and values_readable(m):
        empty = (mc.sum(1) == 0) | (mr.sum(1) == 0)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()
            if empty_completions == "raise":
                raise ValueError(f"pairs {rows} have an empty chosen or rejected completion (mask all 0); pass "
                                 f"empty_completions='drop' (TRL >= 0.29) or 'keep'")
            kept = (~empty).nonzero().flatten()
            if kept.numel() == 0:
                raise ValueError("every pair has an empty completion; nothing left after dropping them")
            pc_t, pr_t, mc, mr = pc_t[kept], pr_t[kept], mc[kept], mr[kept]
    if ld_alpha is None:
        pc, pr = sequence_logps(pc_t, mc), sequence_logps(pr_t, mr)
    else:
        pc, pr = ld_sequence_logps(pc_t, mc, pr_t, mr, ld_alpha)
    rc = rr = None
    if ref_token_logps is not None:
        rm = mask if ref_mask is None else ref_mask
        ref_token_logps, rm = _check_token_inputs(ref_token_logps, rm, "ref_token_logps")
        if ref_token_logps.shape[0] != policy_token_logps.shape[0]:
            raise ValueError(
                f"ref_token_logps has {ref_token_logps.shape[0]} rows but policy_token_logps has {policy_token_logps.shape[0]}")
        ref_token_logps = ref_token_logps.detach()
        rc_t, rr_t = split_chosen_rejected(ref_token_logps)
        rmc, rmr = split_chosen_rejected(rm)
        if kept is not None:
            rc_t, rr_t, rmc, rmr = rc_t[kept], rr_t[kept], rmc[kept], rmr[kept]
        if ld_alpha is None:
            rc, rr = sequence_logps(rc_t, rmc), sequence_logps(rr_t, rmr)
        else:
            rc, rr = ld_sequence_logps(rc_t, rmc, rr_t, rmr, ld_alpha)
    nll = chosen_nll(pc_t, mc) if not values_readable(mc) or bool(mc.any()) else None
    return PreferenceBatch(
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        chosen_lengths=mc.sum(1),
        rejected_lengths=mr.sum(1),
        chosen_nll=nll,
        kept=kept,
    )
