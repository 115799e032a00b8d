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
