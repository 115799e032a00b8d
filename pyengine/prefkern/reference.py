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
    ignored = labels == ignore_index
    # masked rows contribute exactly zero, to values and to gradients, whatever they hold (NaN included)
    z = torch.where(ignored.unsqueeze(-1), 0.0, logits.to(compute_dtype)) / temperature
    logp = torch.log_softmax(z, dim=-1)
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
    kept = (labels != ignore_index).unsqueeze(-1)
    logits = torch.where(kept, hidden.to(compute_dtype), 0.0) @ weight.to(compute_dtype).t()
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
    """TRL's plain path: full logits (in the input dtype), fp32 log-softmax, gather, masked sums, then
    the catalog loss.

    hidden : [2B, T, H] ``[chosen; rejected]``; weight : [V, H]; labels : [2B, T]. Returns the
    catalog's ``PreferenceLossOutput``. What ``FusedLinearPreferenceLoss`` is tested and benchmarked
    against.
    """
    from .losses import preference_batch, preference_loss

    def token_logps(h, w, b):
        # as TRL does it: the lm-head product in the model's dtype, the log-softmax in fp32
        logits = h.reshape(-1, h.shape[-1]) @ w.t()
        if b is not None:
            logits = logits + b
        return logprobs(logits, labels.reshape(-1), ignore_index).reshape(labels.shape)

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
# ---- sampling (issue #6) ---------------------------------------------------------------------------
# The counter-based random stream every backend shares, the sort-based filtered distribution, token
# sampling from it, and the best-of-n / RAFT / RSO selection rules (LOSSES.md F.1-F.3).

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_SQRT2_FRAC = 0x6A09E667


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 integer hash on the low 32 bits of an int64 tensor (result in [0, 2^32))."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sampling_row_key(seed: torch.Tensor, offset: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """32-bit key of output row ``row`` for ``(seed, offset)`` (int64 tensors, broadcast), as an int64 tensor.

    ``key = mix(mix(mix(mix(mix(lo(seed) ^ 0x9E3779B9) ^ hi(seed)) ^ lo(offset)) ^ hi(offset)) ^ row)``;
    the C++, CUDA and Triton kernels compute the same integers.
    """
    seed, offset, row = seed.long(), offset.long(), row.long()
    k = _mix32((seed & _M32) ^ _GOLDEN)
    k = _mix32(k ^ ((seed >> 32) & _M32))
    k = _mix32(k ^ (offset & _M32))
    k = _mix32(k ^ ((offset >> 32) & _M32))
    return _mix32(k ^ (row & _M32))


def sampling_uniforms(key: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Uniform draws in (0, 1) for keys ``[R, 1]`` and columns ``[V]`` (or broadcastable): float32 ``[R, V]``.

    ``u = (2 * (h >> 9) + 1) * 2^-24`` with ``h = mix(mix(key ^ column) + 0x6A09E667)``: 23 random bits,
    exactly representable in float32, never 0 or 1.
    """
    h = _mix32(_mix32(key.long() ^ columns.long()) + _SQRT2_FRAC)
    return ((h >> 9) * 2 + 1).to(torch.float32) * (2.0 ** -24)


def sampling_gumbel(key: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Gumbel noise ``-log(-log(u))`` from :func:`sampling_uniforms`, float32."""
    u = sampling_uniforms(key, columns)
    return -torch.log(-torch.log(u))


def _param_column(value, rows: int, dtype: torch.dtype, device: torch.device, default) -> torch.Tensor:
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(-1, 1).expand(rows, 1)
    return torch.full((rows, 1), value, dtype=dtype, device=device)


def sampling_probs(
    logits: torch.Tensor,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    row_index: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The distribution :func:`prefkern.sample` draws from, built the plain way (softmax, sort, cumsum).

    ``z = logits[row_index] / temperature``; a row with temperature 0 is greedy (all mass on the first
    maximum). Filters, in vLLM's order: ``min_p`` keeps ``p >= min_p * max(p)``; ``top_k`` keeps
    ``z >= `` the k-th largest ``z`` (ties at the boundary kept; ``k <= 0`` or ``k >= V`` disables);
    ``top_p`` then works on the distribution renormalised over the survivors: sorted descending, a
    token is kept while the mass strictly before it is ``< top_p`` (at least one token), and every
    token tied with the last kept one is kept too. The survivors are renormalised.

    Parameters
    ----------
    logits : [L, V] float tensor
    temperature, top_k, top_p, min_p : one number or a [R] tensor each (``None`` disables a filter)
    row_index : [R] integer tensor of rows of ``logits`` (default ``arange(L)``)

    Returns
    -------
    [R, V] tensor in ``compute_dtype``: each row sums to 1; zero exactly on filtered-out tokens.
    """
    if row_index is not None:
        logits = logits.index_select(0, row_index.long())
    r, v = logits.shape
    dev = logits.device
    x = logits.to(compute_dtype)
    temp = _param_column(temperature, r, compute_dtype, dev, 1.0)
    greedy = temp == 0
    z = x / torch.where(greedy, torch.ones_like(temp), temp)
    m = z.max(dim=-1, keepdim=True).values
    p = torch.exp(z - m)
    keep = torch.ones_like(z, dtype=torch.bool)
    if min_p is not None:
        mp = _param_column(min_p, r, compute_dtype, dev, 0.0)
        keep &= p >= mp
    if top_k is not None:
        k = _param_column(top_k, r, torch.int64, dev, 0)
        on = (k > 0) & (k < v)
        zs = z.sort(dim=-1, descending=True).values
        kth = zs.gather(1, (k.clamp(1, max(v, 1)) - 1))
        keep &= ~on | (z >= kth)
    if top_p is not None:
        tp = _param_column(top_p, r, compute_dtype, dev, 1.0)
        q = torch.where(keep, p, torch.zeros_like(p))
        q = q / q.sum(dim=-1, keepdim=True)
        qs = q.sort(dim=-1, descending=True).values
        before = qs.cumsum(dim=-1) - qs
        count = (before < tp).sum(dim=-1, keepdim=True).clamp(min=1)
        thr = qs.gather(1, count - 1)
        keep &= (tp >= 1) | (q >= thr)
    p = torch.where(keep, p, torch.zeros_like(p))
    first_max = torch.zeros_like(p).scatter_(1, x.argmax(dim=-1, keepdim=True), 1.0)
    p = torch.where(greedy, first_max, p)
    return p / p.sum(dim=-1, keepdim=True)


def sample(
    logits: torch.Tensor,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    seed=None,
    offset=None,
    row_index: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
):
    """Token sampling the plain way: :func:`sampling_probs` (softmax, sort, cumsum), then a draw.

    With ``generator`` (and no ``seed``) the draw is ``torch.multinomial`` on that generator. Otherwise
    the draw is Gumbel-max over the surviving tokens with the counter-based stream of
    :func:`sampling_gumbel` for ``(seed, offset, output row)``, the stream the kernels use, so that the
    tokens can be compared exactly. Returns tokens [R] int64 (and their float32 log-probs under the
    sampling distribution when ``return_logprobs``).
    """
    probs = sampling_probs(logits, temperature, top_k, top_p, min_p, row_index, torch.float32)
    r, v = probs.shape
    if generator is not None and seed is None:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1) if r else probs.new_zeros(0, dtype=torch.long)
    else:
        dev = logits.device
        seeds = _param_column(0 if seed is None else seed, r, torch.int64, dev, 0)
        offs = _param_column(offset, r, torch.int64, dev, 0)
        key = sampling_row_key(seeds, offs, torch.arange(r, device=dev).unsqueeze(-1))
        g = sampling_gumbel(key, torch.arange(v, device=dev))
        score = torch.where(probs > 0, torch.log(probs) + g, torch.full_like(probs, -float("inf")))
        tokens = score.argmax(dim=-1) if v else probs.new_zeros(r, dtype=torch.long)
    if not return_logprobs:
        return tokens
    return tokens, torch.log(probs.gather(1, tokens.unsqueeze(-1))).squeeze(-1).float()


def best_of_n_kl_bound(n: int) -> float:
    """Best-of-n KL upper bound ``log n - (n - 1) / n`` (Coste et al. Eq. 1; an upper bound per Beirami et al.)."""
    import math

    return math.log(n) - (n - 1) / n


def best_of_n_select(scores: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Per-prompt top-``k`` of ``scores`` [P, n] by a plain Python loop: indices [P, k] into each row,
    descending score, ties to the lower index, NaN ranked below everything (TRL's BestOfNSampler with
    ``n_candidates=k``; RAFT local mode for ``k=1``)."""
    out = []
    for row in scores.double().tolist():
        key = [(-(s if s == s else -float("inf")), j) for j, s in enumerate(row)]
        out.append([j for _, j in sorted(key)[:k]])
    return torch.tensor(out, dtype=torch.long).reshape(len(out), k)


def rso_select(rewards, num_samples: int, beta: float, uniforms) -> list:
    """RSO Algorithm 1 (Liu et al., Appendix A.1) for one prompt, with the uniform draws given.

    ``uniforms[j][i]`` is the draw for candidate ``i`` in pass ``j`` (candidates keep their original
    index; the draw of an already accepted candidate is unused). Returns the accepted candidate
    indices in acceptance order. ``beta == 0`` accepts only candidates tied with the current maximum.
    """
    import math

    remaining = list(range(len(rewards)))
    accepted: list = []
    j = 0
    while len(accepted) < num_samples and remaining:
        r_max = max(rewards[i] for i in remaining)
        taken = []
        for i in remaining:
            d = rewards[i] - r_max
            prob = 1.0 if d == 0 else (math.exp(d / beta) if beta > 0 else 0.0)
            if uniforms[j][i] >= prob:
                continue
            accepted.append(i)
            taken.append(i)
            if len(accepted) == num_samples:
                break
        remaining = [i for i in remaining if i not in taken]
        j += 1
    return accepted


def sample_sort_path(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Torch's sort-based top-k / top-p sampling as vLLM's native (non-FlashInfer) path does it: the
    benchmark baseline. Sort ascending, mask below the k-th largest, softmax + cumsum to mask the
    bottom ``1 - top_p`` of the mass (keeping the largest), scatter back, softmax, and draw with the
    exponential trick ``argmax(p / q)``, ``q ~ Exp(1)``. Returns tokens [R] int64."""
    x = logits.float() / temperature
    if top_k is not None or top_p is not None:
        v = x.shape[-1]
        xs, idx = x.sort(dim=-1, descending=False)
        if top_k is not None:
            kth = xs.gather(1, torch.full((x.shape[0], 1), v - top_k, device=x.device))
            xs = xs.masked_fill(xs < kth, -float("inf"))
        if top_p is not None:
            cum = xs.softmax(dim=-1).cumsum(dim=-1)
            mask = cum <= 1 - top_p
            mask[:, -1] = False
            xs = xs.masked_fill(mask, -float("inf"))
        x = xs.scatter(-1, idx, xs)
    probs = x.softmax(dim=-1)
    q = torch.empty_like(probs).exponential_(generator=generator)
    return probs.div_(q).argmax(dim=-1)
