"""Best-of-n selection: per-prompt argmax, RAFT top-k and RSO rejection sampling over ``[P, n]`` scores.

LOSSES.md section F gives the rules: F.1 TRL's ``BestOfNSampler`` (top ``n_candidates`` of
``sample_size``), F.2 RAFT (local: argmax of K per prompt; top: global top fraction), F.3 RSO
(Algorithm 1 of Liu et al.). The selection runs on the device without a host synchronisation.
The end-to-end helper that drives a Hugging Face model (``BestOfN``) lives in
:mod:`prefkern.integrations.hf`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import reference
from ._validation import INT64_MAX, INT64_MIN, check_choice, check_integer, check_number, check_tensor
from .ops.sampling import sample  # re-exported as prefkern.sample

__all__ = ["Selection", "best_of_n", "rso_accept", "sample"]

METHODS = ("argmax", "topk", "rso")


@dataclass
class Selection:
    """What :func:`best_of_n` returns.

    Attributes
    ----------
    indices : [P, k] int64, indices into the flat candidate list (prompt ``p``'s candidates are
        ``p * n .. p * n + n - 1``), best first (RSO: in acceptance order).
    local : [P, k] int64, the same indices within each prompt (``indices - p * n``).
    scores : [P, k], the chosen scores (dtype of the input).
    valid : [P, k] bool, False where the chosen score is not finite (a discarded candidate, e.g.
        RAFT's -inf / NaN rewards): callers drop those without a host sync.
    kl_bound : best-of-n KL upper bound ``log n - (n - 1) / n`` (Coste et al. Eq. 1; Beirami et al.).
    """

    indices: torch.Tensor
    local: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    kl_bound: float


def _as_matrix(scores: torch.Tensor, n: Optional[int]) -> torch.Tensor:
    check_tensor("scores", scores)
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if scores.dim() == 2:
        if n is not None and n != scores.shape[1]:
            raise ValueError(f"n = {n} does not match scores of shape [P, n] = {tuple(scores.shape)}")
        return scores
    if scores.dim() == 1:
        if n is None or not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError("flat scores [P*n] need n, a positive int (the number of candidates per prompt)")
        if scores.shape[0] % n:
            raise ValueError(f"flat scores of length {scores.shape[0]} are not a multiple of n = {n}")
        return scores.reshape(-1, n)
    raise ValueError(f"scores must have shape [P, n] or [P*n], got {tuple(scores.shape)}")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_uniforms(uniforms: object, shape: tuple, device: torch.device) -> torch.Tensor:
    """Explicit RSO draws: a floating [P, k, n] tensor with every value in [0, 1) (values read on the host
    unless a CUDA graph is being captured or ``torch.compile`` is tracing)."""
    check_tensor("uniforms", uniforms)
    if not uniforms.is_floating_point():
        raise TypeError(f"uniforms must be a floating-point tensor, got {uniforms.dtype}")
    if tuple(uniforms.shape) != shape:
        raise ValueError(f"uniforms must have shape [P, k, n] = [{shape[0]}, {shape[1]}, {shape[2]}], got "
                         f"{tuple(uniforms.shape)}")
    uniforms = uniforms.to(device)
    if (uniforms.device.type != "meta" and not _capturing(uniforms.device)
            and not torch.compiler.is_compiling()):
        bad = ~((uniforms >= 0) & (uniforms < 1))  # NaN fails both comparisons
        if bool(bad.any()):
            idx = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"uniforms must lie in [0, 1) (no NaN); uniforms[{', '.join(map(str, idx))}] = "
                             f"{uniforms[idx].item()}")
    return uniforms


def _rso_uniforms(p: int, k: int, n: int, seed, offset, generator, device) -> torch.Tensor:
    """[P, k, n] uniforms from the counter-based stream of prefkern.sample: key (seed, offset, prompt),
    column ``pass * n + candidate``."""
    if seed is None:
        gen_dev = generator.device if generator is not None else device
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_dev).to(device)
    elif not isinstance(seed, torch.Tensor):
        check_integer("seed", seed, low=INT64_MIN, high=INT64_MAX)
    if offset is not None and not isinstance(offset, torch.Tensor):
        check_integer("offset", offset, low=INT64_MIN, high=INT64_MAX)
    seed, offset = (  # torch.full, not as_tensor: no host-to-device copy (CUDA-graph capturable)
        v.to(device=device, dtype=torch.int64).reshape(-1, 1) if isinstance(v, torch.Tensor)
        else torch.full((1, 1), int(v), dtype=torch.int64, device=device)
        for v in (seed, 0 if offset is None else offset)
    )
    key = reference.sampling_row_key(seed, offset, torch.arange(p, device=device).unsqueeze(-1))
    return reference.sampling_uniforms(key, torch.arange(k * n, device=device)).reshape(p, k, n)


def rso_accept(rewards: torch.Tensor, num_samples: int, beta: float, uniforms: torch.Tensor) -> torch.Tensor:
    """RSO Algorithm 1 (LOSSES.md F.3) for every prompt at once, with fixed shapes.

    Pass ``j`` uses ``uniforms[:, j, i]`` for candidate ``i``; a pass accepts, in candidate order,
    each remaining candidate with ``u < exp((r - r_max) / beta)`` (``r_max`` over the remaining ones;
    candidates tied with it always pass) until ``num_samples`` are taken. Every pass accepts at least
    one candidate, so ``num_samples`` passes always suffice: no data-dependent loop, no host sync.
    NaN rewards rank below every number: a pass considers NaN candidates only once no numeric
    candidate remains, and then accepts them in candidate order.

    Parameters
    ----------
    rewards : [P, n] float tensor.
    num_samples : how many to accept per prompt (``<= n``).
    beta : temperature (>= 0; 0 accepts only candidates tied with the maximum).
    uniforms : [P, num_samples, n] in [0, 1).

    Returns
    -------
    [P, num_samples] int64 candidate indices in acceptance order.
    """
    p, n = rewards.shape
    nan = torch.isnan(rewards)
    r = torch.nan_to_num(rewards.double(), nan=-math.inf)
    remaining = torch.ones(p, n, dtype=torch.bool, device=r.device)
    count = torch.zeros(p, 1, dtype=torch.int64, device=r.device)
    out = torch.zeros(p, num_samples + 1, dtype=torch.int64, device=r.device)
    cols = torch.arange(n, device=r.device).expand(p, n)
    neg = torch.full_like(r, -math.inf)
    for j in range(num_samples):
        numeric = remaining & ~nan
        pool = torch.where(numeric.any(dim=-1, keepdim=True), numeric, remaining)
        r_max = torch.where(pool, r, neg).max(dim=-1, keepdim=True).values
        d = r - r_max
        if beta > 0:
            prob = torch.exp(torch.where(r == r_max, torch.zeros_like(d), d) / beta)
        else:
            prob = (r == r_max).double()
        acc = pool & (uniforms[:, j, :].double() < prob)
        cum = acc.long().cumsum(dim=-1)
        acc &= (cum + count) <= num_samples
        slot = torch.where(acc, count + cum - 1, torch.full_like(cum, num_samples))
        out.scatter_(1, slot, torch.where(acc, cols, torch.zeros_like(cols)))
        count += acc.long().sum(dim=-1, keepdim=True)
        remaining &= ~acc
    return out[:, :num_samples]


def _rank_order(s: torch.Tensor, k: int) -> torch.Tensor:
    """[P, k] local indices of the k best candidates: numbers in descending order (ties: lower index
    first), then NaN candidates in index order."""
    key = torch.nan_to_num(s, nan=-math.inf)
    order = key.sort(dim=-1, descending=True, stable=True).indices
    is_nan = torch.isnan(s).gather(1, order)
    return order.gather(1, is_nan.to(torch.uint8).sort(dim=-1, stable=True).indices)[:, :k]


def _argmax(s: torch.Tensor) -> torch.Tensor:
    """[P, 1] the first maximum among the numbers of each row (index 0 for an all-NaN row)."""
    numeric = ~torch.isnan(s)
    best = torch.where(numeric, s, torch.full_like(s, -math.inf)).amax(dim=-1, keepdim=True)
    hit = numeric & (s == best)
    return hit.to(torch.uint8).argmax(dim=-1, keepdim=True)  # first True; all False (all NaN) gives 0


def _check_beta(beta: object) -> float:
    """RSO's temperature: a finite number >= 0 (Python or NumPy)."""
    try:
        value = check_number("beta", beta)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    return value


def best_of_n(
    scores: torch.Tensor,
    n: Optional[int] = None,
    *,
    k: int = 1,
    method: str = "argmax",
    beta: float = 0.5,
    seed: Union[int, torch.Tensor, None] = None,
    offset: Union[int, torch.Tensor, None] = None,
    generator: Optional[torch.Generator] = None,
    uniforms: Optional[torch.Tensor] = None,
) -> Selection:
    """Select the best candidate(s) of each prompt, on the device, without a host sync.

    Parameters
    ----------
    scores : [P, n] float tensor, or flat [P*n] (prompt-major, as ``ensemble_reduce`` returns them)
        together with ``n``. NaN ranks below every number, ``-inf`` included: a NaN candidate is chosen
        only when no numeric candidate is left (its ``valid`` is then False).
    n : candidates per prompt (needed for flat scores).
    k : how many to keep per prompt (``argmax`` needs ``k == 1``; ``1 <= k <= n``).
    method : ``"argmax"`` (best-of-n, RAFT local mode), ``"topk"`` (TRL BestOfNSampler's
        ``n_candidates``; RAFT top mode on ``[1, N]`` scores with ``k = floor(N * alpha)``) or ``"rso"``
        (statistical rejection sampling, LOSSES.md F.3, accepting ``k`` per prompt).
    beta : RSO temperature (> 0; 0 accepts only candidates tied with the current maximum: top-k).
    seed, offset, generator : RSO randomness, the counter-based stream of :func:`prefkern.sample`
        (key ``(seed, offset, prompt)``, column ``pass * n + candidate``); seed drawn from
        ``generator`` (or the default generator) when ``None``. Integers must fit int64.
    uniforms : [P, k, n] explicit RSO draws in [0, 1) (tests, or replaying the paper's listing);
        values outside [0, 1) or NaN raise ValueError (checked on the host, except while a CUDA graph
        is being captured or ``torch.compile`` is tracing).

    Returns
    -------
    :class:`Selection` with ``indices``/``local``/``scores``/``valid`` of shape [P, k] and
    ``kl_bound = log n - (n - 1) / n``. Ties go to the lower index (argmax, topk).
    """
    s = _as_matrix(scores, n)
    p, nn = s.shape
    check_choice("method", method, METHODS)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max(nn, 1):
        raise ValueError(f"k must be an int in [1, n] = [1, {nn}], got {k!r}")
    if method == "argmax" and k != 1:
        raise ValueError("method='argmax' keeps one candidate per prompt: use k=1 or method='topk'")
    if nn == 0:
        raise ValueError("scores must have at least one candidate per prompt (n >= 1)")
    key = s.float() if s.dtype != torch.float64 else s
    if method == "argmax":
        local = _argmax(key)
    elif method == "topk":
        local = _rank_order(key, k)
    else:
        beta = _check_beta(beta)
        if uniforms is None:
            uniforms = _rso_uniforms(p, k, nn, seed, offset, generator, s.device)
        else:
            uniforms = _check_uniforms(uniforms, (p, k, nn), s.device)
        local = rso_accept(key, k, beta, uniforms)
    chosen = s.gather(1, local)
    base = torch.arange(p, device=s.device).unsqueeze(-1) * nn
    return Selection(indices=local + base, local=local, scores=chosen, valid=torch.isfinite(chosen),
                     kl_bound=reference.best_of_n_kl_bound(nn))
