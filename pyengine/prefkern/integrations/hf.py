"""Hugging Face integrations: ``BestOfN`` drives a causal LM (``generate`` or a decode loop on
:func:`prefkern.sample`) and a reward end to end; ``RewardEnsemble`` scores with K separate reward models
and reduces them with :func:`prefkern.ensemble_reduce`.

Everything model-specific lives here: tokenizer padding, pad/eos guessing, KV-cache argument names.
Randomness comes from a ``torch.Generator`` seeded from the user's seed; the global RNG is never seeded.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._validation import INT64_MAX, INT64_MIN, check_integer
from ..best_of_n import METHODS, Selection, best_of_n
from ..ensemble import EnsembleScores, Normalize, _check_lam_ddof, _group, _method_code, ensemble_reduce
from ..ops.sampling import sample

__all__ = ["BestOfN", "BestOfNResult", "RewardEnsemble", "mean_over_members"]

RewardFn = Callable[..., Any]


_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p")


def _draw_seed(generator: torch.Generator) -> int:
    """A fresh 62-bit seed from ``generator`` (CPU, no device sync)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


class _SeededSampling:
    """A ``transformers`` logits processor that draws each step's token with :func:`prefkern.sample`
    (seed and offset from the caller, so no global RNG is touched) and returns scores that keep only
    that token, so that ``generate``'s greedy step picks it."""

    def __init__(self, seed: int, prompt_width: int, sampling: Dict[str, Any]) -> None:
        self.seed, self.prompt_width, self.sampling = seed, prompt_width, sampling

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = scores.shape[0]
        step = input_ids.shape[1] - self.prompt_width
        offset = torch.full((rows,), step, dtype=torch.int64, device=scores.device)
        tok = sample(scores.float(), seed=torch.full((rows,), self.seed, dtype=torch.int64, device=scores.device),
                     offset=offset, **self.sampling)
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(1, tok.unsqueeze(-1), 0.0)


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
    policy : a causal LM. With ``sampler="hf"`` its ``generate`` runs the decode loop (other
        ``generation_kwargs`` passed through) and a logits processor draws every token with
        :func:`prefkern.sample`; with ``sampler="prefkern"`` a decode loop calls ``step_fn`` (default:
        the model's forward with its KV cache) and :func:`prefkern.sample`.
    tokenizer : a Hugging Face tokenizer (``__call__`` with padding, ``batch_decode``, ``pad_token_id``,
        ``eos_token_id``), or None when prompts are token ids and the reward takes ids.
    reward : a callable. ``reward_inputs="text"``: ``reward(prompts, completions)`` with two lists of
        N = P*n strings; ``"ids"``: ``reward(input_ids [N, T], attention_mask [N, T])`` on the full
        sequences (by keyword when ``reward`` is an ``nn.Module``, positionally otherwise). It returns
        scores [N], [K, N] (K ensemble members; reduced by ``reduce``, default the mean over K, e.g. an
        ``ensemble_reduce`` partial) or ``EnsembleScores`` (a
        ``RewardEnsemble`` used with ``reward_inputs="ids"``, or an ``EnsembleRewardHead`` on a
        backbone): its ``combined`` scores are used as they are, its ``scores`` kept as member scores.
    n : candidates per prompt.
    k, method, beta : passed to :func:`best_of_n`.
    generation_kwargs : ``max_new_tokens`` and sampling settings (``temperature``, ``top_k``,
        ``top_p``, ``min_p``; with ``sampler="hf"`` those not given come from the policy's
        ``generation_config``) for either sampler, drawn by :func:`prefkern.sample`; other keys go to
        ``generate`` (``do_sample`` is ignored; a ``logits_processor`` list runs before the draw).
    sampler : ``"hf"`` or ``"prefkern"``.
    step_fn : for ``sampler="prefkern"``: ``step_fn(input_ids [R, t], attention_mask [R, t], state)
        -> (logits [R, V], state)``; called first with the whole prompt and ``state=None``, then with
        the last token only.
    seed : seeds this helper's own ``torch.Generator`` (int64 range), from which every call draws the
        seeds of its sampling and RSO streams: the same seed gives the same runs, and the global torch
        RNG is neither read nor seeded. ``None``: the generator is seeded nondeterministically.
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
        if seed is not None:
            check_integer("seed", seed, low=INT64_MIN, high=INT64_MAX)
        self.reward_inputs, self.sampler, self.step_fn, self.seed = reward_inputs, sampler, step_fn, seed
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed) & (2**64 - 1))

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
        cfg = getattr(self.policy, "config", None)
        for name in ("pad_token_id", "eos_token_id"):
            if pad is None:
                pad = getattr(cfg, name, None)
        return 0 if pad is None else int(pad)

    def _eos_id(self) -> Optional[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if eos is None:
            eos = getattr(getattr(self.policy, "config", None), "eos_token_id", None)
        return None if eos is None else int(eos)

    def _sampling_settings(self) -> Tuple[Dict[str, Any], Dict[str, Any], int]:
        kw = dict(self.generation_kwargs)
        max_new = int(kw.pop("max_new_tokens", 16))
        sampling = {name: kw.pop(name) for name in _SAMPLING_KEYS if name in kw}
        return sampling, kw, max_new

    def _generate_hf(self, ids, mask, seed: int) -> torch.Tensor:
        from transformers import LogitsProcessorList

        sampling, rest, max_new = self._sampling_settings()
        rest.pop("do_sample", None)
        defaults = getattr(self.policy, "generation_config", None)  # e.g. transformers' top_k=50
        for name in _SAMPLING_KEYS:
            if name not in sampling and getattr(defaults, name, None) is not None:
                sampling[name] = getattr(defaults, name)
        processors = LogitsProcessorList(rest.pop("logits_processor", None) or [])
        processors.append(_SeededSampling(seed, ids.shape[1], sampling))
        # the draw happens in the processor: generate itself runs greedy, with its own sampling settings off
        out = self.policy.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                   pad_token_id=self._pad_id(), logits_processor=processors,
                                   **{name: None for name in _SAMPLING_KEYS}, **rest)
        return out[:, ids.shape[1]:]

    def _default_step(self, input_ids, attention_mask, state):
        """One forward of a Hugging Face causal LM with its KV cache (``cache`` in transformers >= 5.2x,
        ``past_key_values`` before) and position ids that skip the left padding."""
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
    def _generate_prefkern(self, ids, mask, seed: int) -> torch.Tensor:
        sampling, _, max_new = self._sampling_settings()
        step = self.step_fn or self._default_step
        r, dev = ids.shape[0], ids.device
        pad, eos = self._pad_id(), self._eos_id()
        seed = torch.full((r,), seed, dtype=torch.int64, device=dev)
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
        sample_seed, select_seed = _draw_seed(self.generator), _draw_seed(self.generator)
        generate = self._generate_hf if self.sampler == "hf" else self._generate_prefkern
        gen = generate(ids_rep, mask_rep, sample_seed)
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
        sel = best_of_n(scores, k=self.k, method=self.method, beta=self.beta, seed=select_seed)
        grouped = [comp[i * self.n:(i + 1) * self.n] for i in range(p)]
        best = [[grouped[i][j] for j in row] for i, row in enumerate(sel.local.tolist())]
        return BestOfNResult(texts, grouped, gen, scores, members, sel, best)


# ---- K separate reward models -----------------------------------------------------------------------


def _member_scores(out: Any, k: int, batch: Optional[int]) -> torch.Tensor:
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"reward model {k} returned {type(out).__name__}; expected a tensor or an output with .logits")
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.dim() != 1 or (batch is not None and logits.shape[0] != batch):
        raise ValueError(f"reward model {k} returned scores of shape {tuple(logits.shape)}; expected [B] or [B, 1]"
                         + (f" with B = {batch}" if batch is not None else ""))
    return logits


class RewardEnsemble(nn.Module):
    """K reward models sharing a tokenizer, scored on one batch and reduced on the device.

    Parameters
    ----------
    models : K Hugging Face ``*ForSequenceClassification`` models with ``num_labels=1`` (or any callables
        returning [B] / [B, 1] scores, or an output with ``.logits``), all taking the same inputs.
    method, lam, ddof, normalize : the reduction (see ``ensemble_reduce``); ``normalize`` = (mu, sigma) [K].
    backend : backend of the reduction.
    """

    def __init__(
        self, models: Sequence[Callable], *, method: str = "mean", lam: float = 0.5, ddof: int = 0,
        normalize: Normalize = None, backend: str = "auto",
    ) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("models must hold at least one reward model")
        for i, m in enumerate(models):
            if not callable(m):
                raise TypeError(f"models[{i}] is not callable: {type(m).__name__}")
        _method_code(method)
        _check_lam_ddof(lam, ddof, len(models))
        self.members = nn.ModuleList(m for m in models if isinstance(m, nn.Module))
        self._models = models
        self.method, self.lam, self.ddof, self.normalize, self.backend = method, lam, ddof, normalize, backend

    @property
    def num_members(self) -> int:
        return len(self._models)

    def member_scores(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """[K, B] fp32 scores: each model called with the same arguments, stacked on the first one's device."""
        rows = []
        batch = None
        for k, model in enumerate(self._models):
            s = _member_scores(model(*args, **kwargs), k, batch)
            batch = s.shape[0]
            rows.append(s)
        device = rows[0].device
        return torch.stack([r.to(device=device, dtype=torch.float32) for r in rows])

    def forward(self, *args: Any, group_size: Optional[int] = None, method: Optional[str] = None,
                lam: Optional[float] = None, ddof: Optional[int] = None, **kwargs: Any) -> EnsembleScores:
        """Score a batch with every model (same ``args``/``kwargs``, e.g. ``input_ids``, ``attention_mask``)
        and reduce; returns EnsembleScores with raw member ``scores`` [K, B] (or [K, P, n])."""
        scores = self.member_scores(*args, **kwargs)
        out = ensemble_reduce(
            scores, self.method if method is None else method, self.lam if lam is None else lam,
            self.ddof if ddof is None else ddof, self.normalize, group_size=group_size, backend=self.backend,
        )
        out.scores = _group(scores, group_size)
        return out
