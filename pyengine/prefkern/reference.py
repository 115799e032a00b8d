"""Plain-PyTorch references: the truth every kernel is tested and benchmarked against.

They materialise what the kernels avoid (the log-softmax over the vocabulary) and are written for
clarity, not memory. Benchmarks import the same functions as their "torch" baseline.
"""

from __future__ import annotations

import torch


def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Token log-probs ``log_softmax(logits / temperature)[n, labels[n]]``, 0 where ``labels == ignore_index``.

    Parameters
    ----------
    logits : [N, V] float tensor
    labels : [N] integer tensor
    compute_dtype : dtype of the log-softmax (float32 like the kernels, float64 for ground truth,
        or the input dtype to measure PyTorch's own error in that dtype)

    Returns
    -------
    [N] tensor in ``compute_dtype`` (float32 by default)
    """
    z = logits.to(compute_dtype) / temperature
    logp = torch.log_softmax(z, dim=-1)
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0).long()
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Token log-probs from hidden states through the lm-head, with the logits materialised.

    Parameters
    ----------
    hidden : [N, H]; weight : [V, H]; labels : [N]; bias : [V] or None

    Returns
    -------
    [N] tensor in ``compute_dtype``: ``log_softmax(hidden @ weight.T + bias)[n, labels[n]]``.
    """
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    return logprobs(logits, labels, ignore_index, compute_dtype=compute_dtype)


def preference_loss_from_hidden(
    loss_type: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    **loss_kwargs,
):
    """TRL's plain path: full logits, log-softmax, gather, masked sums, then the catalog loss.

    hidden : [2B, T, H] ``[chosen; rejected]``; weight : [V, H]; labels : [2B, T]. Returns the
    catalog's ``PreferenceLossOutput``. What ``FusedLinearPreferenceLoss`` is tested and benchmarked
    against.
    """
    from .losses import preference_batch, preference_loss

    def token_logps(h, w, b):
        return linear_logprobs(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), b, ignore_index).reshape(labels.shape)

    mask = labels != ignore_index
    ref_tokens = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref_tokens = token_logps(ref_hidden, weight if ref_weight is None else ref_weight,
                                     bias if ref_weight is None else ref_bias)
    batch = preference_batch(token_logps(hidden, weight, bias), mask, ref_tokens)
    return preference_loss(loss_type, batch=batch, **loss_kwargs)

# ---- ensemble (LOSSES.md section E) -----------------------------------------------------------


def ensemble_reduce(
    scores: torch.Tensor,
    method: str = "mean",
    lam: float = 0.5,
    ddof: int = 0,
    mu: "torch.Tensor | None" = None,
    sigma: "torch.Tensor | None" = None,
    compute_dtype: torch.dtype = torch.float32,
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """Combined score, member mean and member variance of an ensemble's scores (Coste et al.).

    Parameters
    ----------
    scores : [K, N] tensor, one row per member
    method : ``"mean"`` (mean over members), ``"wco"`` (minimum) or ``"uwo"`` (mean - lam * var)
    ddof : variance divisor ``K - ddof`` (0: population variance as in the paper's BoN path)
    mu, sigma : optional [K] per-member calibration statistics; members are read as ``(s - mu) / sigma``

    Returns
    -------
    (combined [N], mean [N], var [N]) in ``compute_dtype``
    """
    s = scores.to(compute_dtype)
    if mu is not None:
        s = (s - mu.to(compute_dtype)[:, None]) / sigma.to(compute_dtype)[:, None]
    mean = s.mean(dim=0)
    var = ((s - mean) ** 2).sum(dim=0) / (s.shape[0] - ddof)
    if method == "mean":
        combined = mean
    elif method == "wco":
        combined = s.min(dim=0).values
    elif method == "uwo":
        combined = mean - lam * var
    else:
        raise ValueError(f"method must be 'mean', 'wco' or 'uwo', got {method!r}")
    return combined, mean, var


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] int64 position of the last nonzero entry of each row of ``attention_mask`` [B, T] (-1 if none).

    Works for right padding, left padding and any other layout of the real tokens.
    """
    t = attention_mask.shape[-1]
    positions = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask != 0, positions, -1).amax(dim=-1)


def ensemble_head(
    hidden: torch.Tensor,
    last: torch.Tensor,
    weight: torch.Tensor,
    bias: "torch.Tensor | None" = None,
    method: str = "mean",
    lam: float = 0.5,
    ddof: int = 0,
    mu: "torch.Tensor | None" = None,
    sigma: "torch.Tensor | None" = None,
    compute_dtype: torch.dtype = torch.float32,
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]":
    """K linear reward heads on the last real token, then the ensemble reduction: plain torch.

    gather ``hidden[b, last[b]]`` -> ``linear`` with ``weight`` [K, H] (+ ``bias`` [K]) -> [K, B] scores ->
    ``ensemble_reduce``. With ``compute_dtype`` equal to the input dtype this is what an unfused
    PyTorch implementation computes in that dtype; float64 gives ground truth.

    Returns
    -------
    (scores [K, B], combined [B], mean [B], var [B]) in ``compute_dtype``; scores are raw (not normalised).
    """
    x = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    scores = torch.nn.functional.linear(
        x.to(compute_dtype), weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype)
    ).t()
    combined, mean, var = ensemble_reduce(scores, method, lam, ddof, mu, sigma, compute_dtype)
    return scores, combined, mean, var
