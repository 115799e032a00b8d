"""Best-of-n: per-prompt selection (argmax, RAFT top-k, RSO rejection sampling) and ``BestOfN``, which
drives a causal LM (Hugging Face ``generate`` or a decode loop on ``prefkern.sample``) and a reward.

LOSSES.md section F gives the rules: F.1 TRL's ``BestOfNSampler`` (top ``n_candidates`` of
``sample_size``), F.2 RAFT (local: argmax of K per prompt; top: global top fraction), F.3 RSO
(Algorithm 1 of Liu et al.). The selection runs on the device without a host synchronisation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from . import reference
from ._validation import check_tensor
from .ops.sampling import sample  # re-exported as prefkern.sample

__all__ = ["BestOfN", "BestOfNResult", "Selection", "best_of_n", "rso_accept", "sample"]

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


def _rso_uniforms(p: int, k: int, n: int, seed, offset, generator, device) -> torch.Tensor:
    """[P, k, n] uniforms from the counter-based stream of prefkern.sample: key (seed, offset, prompt),
    column ``pass * n + candidate``."""
    if seed is None:
        gen_dev = generator.device if generator is not None else device
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_dev).to(device)
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

    Parameters
    ----------
    rewards : [P, n] float tensor (NaN counts as -inf)
    uniforms : [P, num_samples, n] in [0, 1)

    Returns
    -------
    [P, num_samples] int64 candidate indices in acceptance order.
    """
    p, n = rewards.shape
    r = torch.nan_to_num(rewards.double(), nan=-math.inf)
    remaining = torch.ones(p, n, dtype=torch.bool, device=r.device)
    count = torch.zeros(p, 1, dtype=torch.int64, device=r.device)
    out = torch.zeros(p, num_samples + 1, dtype=torch.int64, device=r.device)
    cols = torch.arange(n, device=r.device).expand(p, n)
    neg = torch.full_like(r, -math.inf)
    for j in range(num_samples):
        r_max = torch.where(remaining, r, neg).max(dim=-1, keepdim=True).values
        d = r - r_max
        if beta > 0:
            prob = torch.exp(torch.where(r == r_max, torch.zeros_like(d), d) / beta)
        else:
            prob = (r == r_max).double()
        acc = remaining & (uniforms[:, j, :].double() < prob)
        cum = acc.long().cumsum(dim=-1)
        acc &= (cum + count) <= num_samples
        slot = torch.where(acc, count + cum - 1, torch.full_like(cum, num_samples))
        out.scatter_(1, slot, torch.where(acc, cols, torch.zeros_like(cols)))
        count += acc.long().sum(dim=-1, keepdim=True)
        remaining &= ~acc
    return out[:, :num_samples]


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
        together with ``n``. NaN ranks below every number.
    n : candidates per prompt (needed for flat scores).
    k : how many to keep per prompt (``argmax`` needs ``k == 1``; ``1 <= k <= n``).
    method : ``"argmax"`` (best-of-n, RAFT local mode), ``"topk"`` (TRL BestOfNSampler's
        ``n_candidates``; RAFT top mode on ``[1, N]`` scores with ``k = floor(N * alpha)``) or ``"rso"``
        (statistical rejection sampling, LOSSES.md F.3, accepting ``k`` per prompt).
    beta : RSO temperature (> 0; 0 accepts only candidates tied with the current maximum: top-k).
    seed, offset, generator : RSO randomness, the counter-based stream of :func:`prefkern.sample`
        (key ``(seed, offset, prompt)``, column ``pass * n + candidate``); seed drawn from
        ``generator`` (or the default generator) when ``None``.
    uniforms : [P, k, n] explicit RSO draws (tests, or replaying the paper's listing).

    Returns
    -------
    :class:`Selection` with ``indices``/``local``/``scores``/``valid`` of shape [P, k] and
    ``kl_bound = log n - (n - 1) / n``. Ties go to the lower index (argmax, topk).
    """
    s = _as_matrix(scores, n)
    p, nn = s.shape
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max(nn, 1):
        raise ValueError(f"k must be an int in [1, n] = [1, {nn}], got {k!r}")
    if method == "argmax" and k != 1:
        raise ValueError("method='argmax' keeps one candidate per prompt: use k=1 or method='topk'")
    if nn == 0:
        raise ValueError("scores must have at least one candidate per prompt (n >= 1)")
    key = torch.nan_to_num(s.float() if s.dtype != torch.float64 else s, nan=-math.inf)
    if method == "argmax":
        local = key.argmax(dim=-1, keepdim=True)  # first maximum on ties
    elif method == "topk":
        local = key.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    else:
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if uniforms is None:
            uniforms = _rso_uniforms(p, k, nn, seed, offset, generator, s.device)
        elif tuple(uniforms.shape) != (p, k, nn):
            raise ValueError(f"uniforms must have shape [P, k, n] = [{p}, {k}, {nn}], got {tuple(uniforms.shape)}")
        local = rso_accept(key, k, float(beta), uniforms.to(s.device))
    chosen = s.gather(1, local)
    base = torch.arange(p, device=s.device).unsqueeze(-1) * nn
    return Selection(indices=local + base, local=local, scores=chosen, valid=torch.isfinite(chosen),
                     kl_bound=reference.best_of_n_kl_bound(nn))


# ---- end to end ---------------------------------------------------------------------------------------

RewardFn = Callable[..., Any]


@dataclass
class BestOfNResult:
    """What :meth:`BestOfN.generate` returns (P prompts, n candidates each, k kept).

    Attributes
    ----------
    prompts : the P prompt strings (or None when token ids were given without a tokenizer)
    completions : P lists of n completion strings (token-id lists without a tokenizer)
    completion_ids : [P*n, L] int64, generated tokens (pad after the end)
    scores : [P, n] float32 reduced rewards
    member_scores : [K, P*n] raw member scores when the reward returned several, else None
    selection : :class:`Selection`
    best : P lists of the k kept completions, best first
    """

    prompts: Optional[List[str]]
    completions: List[List[Any]]
    completion_ids: torch.Tensor
    scores: torch.Tensor
    member_scores: Optional[torch.Tensor]
    selection: Selection
    best: List[List[Any]] = field(default_factory=list)

    def preference_pairs(self) -> List[Dict[str, Any]]:
        """One (best, worst) pair per prompt for the next DPO round: ``{"prompt", "chosen",
        "rejected", "chosen_score", "rejected_score"}``; prompts whose best and worst are the same
        candidate (n == 1 or all equal scores) or whose scores are not finite are skipped."""
        s = self.scores
        best = best_of_n(s, method="argmax").local.squeeze(-1)
        worst = best_of_n(-s, method="argmax").local.squeeze(-1)
        finite = torch.isfinite(s).all(dim=-1)
        pairs = []
        for i, (b, w, ok) in enumerate(zip(best.tolist(), worst.tolist(), finite.tolist())):
            if not ok or b == w or s[i, b] == s[i, w]:
                continue
            pairs.append({
                "prompt": None if self.prompts is None else self.prompts[i],
                "chosen": self.completions[i][b], "rejected": self.completions[i][w],
                "chosen_score": float(s[i, b]), "rejected_score": float(s[i, w]),
            })
        return pairs

    def write_preference_pairs(self, path: str) -> int:
        """Append :meth:`preference_pairs` to a JSON-lines file; returns how many were written."""
        pairs = self.preference_pairs()
        with open(path, "a", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps(pair) + "\n")
        return len(pairs)


def mean_over_members(scores: torch.Tensor) -> torch.Tensor:
    """Default ``reduce``: mean over the K members of ``[K, N]`` scores."""
    return scores.mean(dim=0)


class BestOfN:
    """Best-of-n end to end: sample n completions per prompt, score them, keep the best.

    Parameters
    ----------
    policy : a causal LM. With ``sampler="hf"`` its ``generate`` draws the candidates (``do_sample``
        and ``generation_kwargs`` passed through); with ``sampler="prefkern"`` a decode loop calls
        ``step_fn`` (default: the model's forward with its KV cache) and :func:`prefkern.sample`.
    tokenizer : a Hugging Face tokenizer (``__call__`` with padding, ``batch_decode``, ``pad_token_id``,
        ``eos_token_id``), or None when prompts are token ids and the reward takes ids.
    reward : a callable. ``reward_inputs="text"``: ``reward(prompts, completions)`` with two lists of
        N = P*n strings; ``"ids"``: ``reward(input_ids [N, T], attention_mask [N, T])`` on the full
        sequences (by keyword when ``reward`` is an ``nn.Module``, positionally otherwise). It returns scores [N], [K, N] (K ensemble members; reduced by ``reduce``, default
        the mean over K, e.g. an ``ensemble_reduce`` partial) or ``EnsembleScores`` (a
        ``RewardEnsemble`` used with ``reward_inputs="ids"``, or an ``EnsembleRewardHead`` on a
        backbone): its ``combined`` scores are used as they are, its ``scores`` kept as member scores.
    n : candidates per prompt.
    k, method, beta : passed to :func:`best_of_n`.
    generation_kwargs : ``max_new_tokens`` and sampling settings (``temperature``, ``top_k``,
        ``top_p``, ``min_p``) for either sampler; other keys go to ``generate``.
    sampler : ``"hf"`` or ``"prefkern"``.
    step_fn : for ``sampler="prefkern"``: ``step_fn(input_ids [R, t], attention_mask [R, t], state)
        -> (logits [R, V], state)``; called first with the whole prompt and ``state=None``, then with
        the last token only.
    seed : makes the whole run reproducible (sampling and RSO).
    """

    def __init__(
        self,
        policy: Any,
        tokenizer: Any,
        reward: RewardFn,
        n: int = 4,
        *,
        k: int = 1,
        method: str = "argmax",
        beta: float = 0.5,
        generation_kwargs: Optional[Dict[str, Any]] = None,
        reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        reward_inputs: str = "text",
        sampler: str = "hf",
        step_fn: Optional[Callable] = None,
        seed: Optional[int] = None,
    ) -> None:
        if not callable(reward):
            raise TypeError(f"reward must be callable, got {type(reward).__name__}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, n] = [1, {n}], got {k}")
        if reward_inputs not in ("text", "ids"):
            raise ValueError(f"reward_inputs must be 'text' or 'ids', got {reward_inputs!r}")
        if reward_inputs == "text" and tokenizer is None:
            raise ValueError("reward_inputs='text' needs a tokenizer to decode completions")
        if sampler not in ("hf", "prefkern"):
            raise ValueError(f"sampler must be 'hf' or 'prefkern', got {sampler!r}")
        if sampler == "hf" and not hasattr(policy, "generate"):
            raise TypeError("sampler='hf' needs a policy with a generate method")
        self.policy, self.tokenizer, self.reward = policy, tokenizer, reward
        self.n, self.k, self.method, self.beta = n, k, method, beta
        self.generation_kwargs = dict(generation_kwargs or {})
        self.reduce = reduce or mean_over_members
        self.reward_inputs, self.sampler, self.step_fn, self.seed = reward_inputs, sampler, step_fn, seed
        self._calls = 0

    # -- generation ------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        try:
            return next(self.policy.parameters()).device
        except (AttributeError, StopIteration, TypeError):
            return torch.device("cpu")

    def _encode(self, prompts) -> Tuple[Optional[List[str]], torch.Tensor, torch.Tensor]:
        dev = self._device()
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, torch.Tensor):
            ids = prompts if prompts.dim() == 2 else prompts.unsqueeze(0)
            mask = torch.ones_like(ids)
            texts = None
        elif isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer")
            tok = self.tokenizer
            old_side = getattr(tok, "padding_side", "left")
            tok.padding_side = "left"  # decoder-only generation continues from the right edge
            try:
                enc = tok(list(prompts), return_tensors="pt", padding=True)
            finally:
                tok.padding_side = old_side
            ids, mask, texts = enc["input_ids"], enc["attention_mask"], list(prompts)
        elif isinstance(prompts, (list, tuple)) and prompts:
            pad = self._pad_id()
            rows = [list(map(int, p)) for p in prompts]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            texts = None
        else:
            raise TypeError("prompts must be a string, a list of strings, a list of token-id lists or a [P, T] tensor")
        return texts, ids.to(dev), mask.to(dev)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        if pad is None:
            pad = getattr(tok, "eos_token_id", None) if tok is not None else None
        if pad is None:
            cfg = getattr(self.policy, "config", None)
            pad = getattr(cfg, "pad_token_id", None) or getattr(cfg, "eos_token_id", None) or 0
        return int(pad)

    def _eos_id(self) -> Optional[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if eos is None:
            eos = getattr(getattr(self.policy, "config", None), "eos_token_id", None)
        return None if eos is None else int(eos)

    def _sampling_settings(self) -> Tuple[Dict[str, Any], Dict[str, Any], int]:
        kw = dict(self.generation_kwargs)
        max_new = int(kw.pop("max_new_tokens", 16))
        sampling = {name: kw.pop(name) for name in ("temperature", "top_k", "top_p", "min_p") if name in kw}
        return sampling, kw, max_new

    def _generate_hf(self, ids, mask) -> torch.Tensor:
        sampling, rest, max_new = self._sampling_settings()
        if self.seed is not None:
            torch.manual_seed(self.seed + self._calls)
        out = self.policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=max_new,
                                   pad_token_id=self._pad_id(), **sampling, **rest)
        return out[:, ids.shape[1]:]

    def _default_step(self, input_ids, attention_mask, state):
        """One forward of a Hugging Face causal LM with its KV cache (``cache`` in transformers >= 5.2x,
        ``past_key_values`` before) and position ids that skip the left padding."""
        import inspect

        params = inspect.signature(self.policy.forward).parameters
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True}
        kwargs["cache" if "cache" in params else "past_key_values"] = state
        if "position_ids" in params:
            pos = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
            kwargs["position_ids"] = pos[:, -input_ids.shape[1]:]
        out = self.policy(**kwargs)
        new_state = getattr(out, "cache", None)
        if new_state is None:
            new_state = getattr(out, "past_key_values", None)
        return out.logits[:, -1, :], new_state

    @torch.no_grad()
    def _generate_prefkern(self, ids, mask) -> torch.Tensor:
        sampling, _, max_new = self._sampling_settings()
        step = self.step_fn or self._default_step
        r, dev = ids.shape[0], ids.device
        pad, eos = self._pad_id(), self._eos_id()
        seed = torch.full((r,), 0 if self.seed is None else self.seed, dtype=torch.int64, device=dev)
        if self.seed is None:
            seed = seed + torch.randint(0, 2**62, (1,), device=dev)
        seed = seed + self._calls * 1_000_003
        done = torch.zeros(r, dtype=torch.bool, device=dev)
        out = []
        logits, state = step(ids, mask, None)
        for t in range(max_new):
            tok = sample(logits.float() if logits.dtype == torch.float64 else logits, seed=seed,
                         offset=torch.full((r,), t, dtype=torch.int64, device=dev), **sampling)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            out.append(tok)
            if eos is not None:
                done |= tok == eos
            if t + 1 == max_new:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)  # finished rows are discarded later
            logits, state = step(tok.unsqueeze(-1), mask, state)
        return torch.stack(out, dim=-1) if out else ids.new_zeros(r, 0)

    # -- scoring and selection -------------------------------------------------------------------
    def _score(self, texts_rep, completions_text, full_ids, full_mask) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.reward_inputs == "text":
            raw = self.reward(texts_rep, completions_text)
        else:
            # modules (HF models, RewardEnsemble) take keywords; a plain callable takes (ids, mask)
            if isinstance(self.reward, torch.nn.Module):
                raw = self.reward(input_ids=full_ids, attention_mask=full_mask)
            else:
                raw = self.reward(full_ids, full_mask)
        n_total = full_ids.shape[0]
        if hasattr(raw, "combined") and hasattr(raw, "scores"):
            # EnsembleScores from RewardEnsemble / EnsembleRewardHead: already reduced on the device
            combined = torch.as_tensor(raw.combined).detach().reshape(-1)
            members = None if raw.scores is None else torch.as_tensor(raw.scores).detach().reshape(-1, n_total)
            if combined.shape != (n_total,):
                raise ValueError(f"reward returned ensemble scores for {combined.shape[0]} completions, expected {n_total}")
            return combined.float(), members
        raw = torch.as_tensor(raw).detach()
        if raw.dim() == 1 and raw.shape[0] == n_total:
            return raw.float(), None
        if raw.dim() == 2 and raw.shape[1] == n_total:
            reduced = torch.as_tensor(self.reduce(raw))
            if reduced.shape != (n_total,):
                raise ValueError(f"reduce must map [K, N] scores to [N] = [{n_total}], got {tuple(reduced.shape)}")
            return reduced.float(), raw
        raise ValueError(f"reward must return scores of shape [N] or [K, N] with N = {n_total}, got {tuple(raw.shape)}")

    def generate(self, prompts) -> BestOfNResult:
        """Sample ``n`` completions for each prompt, score them, select ``k``.

        Parameters
        ----------
        prompts : a string, a list of P strings, a list of P token-id lists, or a [P, T] tensor.

        Returns
        -------
        :class:`BestOfNResult`; ``preference_pairs()`` gives (best, worst) pairs for DPO.
        """
        texts, ids, mask = self._encode(prompts)
        p = ids.shape[0]
        ids_rep = ids.repeat_interleave(self.n, dim=0)
        mask_rep = mask.repeat_interleave(self.n, dim=0)
        gen = self._generate_hf(ids_rep, mask_rep) if self.sampler == "hf" else self._generate_prefkern(ids_rep, mask_rep)
        gen = gen.to(ids.device)
        pad, eos = self._pad_id(), self._eos_id()
        live = torch.ones_like(gen, dtype=torch.bool)
        if eos is not None and gen.shape[1]:
            ended_before = (gen == eos).long().cumsum(dim=-1) - (gen == eos).long()
            live = ended_before == 0
        full_ids = torch.cat([ids_rep, torch.where(live, gen, torch.full_like(gen, pad))], dim=-1)
        full_mask = torch.cat([mask_rep, live.long()], dim=-1)
        if self.tokenizer is not None and hasattr(self.tokenizer, "batch_decode"):
            comp = [self.tokenizer.decode([t for t, ok in zip(row, lv) if ok], skip_special_tokens=True)
                    for row, lv in zip(gen.tolist(), live.tolist())]
        else:
            comp = [[t for t, ok in zip(row, lv) if ok] for row, lv in zip(gen.tolist(), live.tolist())]
        texts_rep = None if texts is None else [t for t in texts for _ in range(self.n)]
        scores, members = self._score(texts_rep, comp, full_ids, full_mask)
        scores = scores.to(ids.device).reshape(p, self.n)
        sel = best_of_n(scores, k=self.k, method=self.method, beta=self.beta,
                        seed=None if self.seed is None else self.seed + self._calls)
        self._calls += 1
        grouped = [comp[i * self.n:(i + 1) * self.n] for i in range(p)]
        best = [[grouped[i][j] for j in row] for i, row in enumerate(sel.local.tolist())]
        return BestOfNResult(texts, grouped, gen, scores, members, sel, best)
