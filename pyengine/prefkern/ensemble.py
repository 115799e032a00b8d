"""Ensemble reward scoring (LOSSES.md section E, Coste et al.): conservative combinations of K reward
members on the device, and K reward heads fused into one kernel.

- ``ensemble_reduce(scores [K, N], method, lam, ddof, normalize)``: combine members' scores.
- ``ensemble_head(hidden, attention_mask, weight, bias, ...)``: K linear heads on the last real token,
  one kernel for gather + K dot products + reduction, differentiable.
- ``EnsembleRewardHead(hidden_size, num_members)``: the module holding the heads' parameters and
  calibration buffers; its forward calls ``ensemble_head`` (``pairwise_loss`` for Bradley-Terry training).

K separate Hugging Face reward models: ``RewardEnsemble`` in :mod:`prefkern.integrations.hf`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import reference
from ._validation import check_float, check_ndim, check_number, check_same_device, check_tensor, float64_backend
from .ops.ensemble import METHODS, ensemble_head_fwd, ensemble_reduce_fwd

ArrayLike = Union[torch.Tensor, np.ndarray]
Normalize = Optional[Tuple[Any, Any]]

__all__ = [
    "EnsembleScores", "ensemble_reduce", "ensemble_head", "calibration_stats", "EnsembleRewardHead",
    "bradley_terry_loss", "bootstrap_weights",
]


@dataclass
class EnsembleScores:
    """What every ensemble scorer returns (fp32; float64 for float64 inputs).

    Attributes
    ----------
    combined : [N] (or [P, n] with ``group_size=n``) the reduced score: mean, WCO or UWO
    mean : same shape, mean of the (normalised) members
    var : same shape, variance of the (normalised) members with divisor ``K - ddof``
    scores : [K, N] (or [K, P, n]) raw per-member scores before normalisation; None from ``ensemble_reduce``
    """

    combined: ArrayLike
    mean: ArrayLike
    var: ArrayLike
    scores: Optional[ArrayLike] = None

    def __iter__(self):
        return iter(getattr(self, f.name) for f in fields(self))

    def _map(self, fn: Callable) -> "EnsembleScores":
        return EnsembleScores(*(None if v is None else fn(v) for v in self))


# ---- argument checks -------------------------------------------------------------------------------


def _method_code(method: str) -> int:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return METHODS.index(method)


def _check_lam_ddof(lam: float, ddof: int, k: int) -> None:
    try:
        lam = check_number("lam", lam)
    except ValueError:  # NaN: reported below with the range
        lam = float("nan")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if not isinstance(ddof, (int, np.integer)) or isinstance(ddof, bool) or ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population variance) or 1 (unbiased), got {ddof!r}")
    if k <= ddof:
        raise ValueError(f"ddof={ddof} needs more than {ddof} member(s), got K={k}")


def _as_tensor(name: str, x: Any) -> Tuple[torch.Tensor, bool]:
    """``x`` as a tensor, and whether it came as a numpy array (results then go back as numpy)."""
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"{name} must be a float16/float32/float64 array, got {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x)), True
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _normalization(normalize: Normalize, k: int, device: torch.device, dtype: torch.dtype):
    """(mu, sigma) [K] in ``dtype`` on ``device`` from ``normalize`` = None or (mu, sigma)."""
    if normalize is None:
        return None, None
    if not isinstance(normalize, (tuple, list)) or len(normalize) != 2:
        raise TypeError("normalize must be None or a pair (mu, sigma) of per-member statistics, each [K]")
    out = []
    for name, v in zip(("mu", "sigma"), normalize):
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v, dtype=np.float64))
        if t.shape != (k,):
            raise ValueError(f"normalize {name} must have shape [K] = [{k}], got {tuple(t.shape)}")
        t = t.detach().to(device=device, dtype=dtype).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"normalize {name} must be finite, got {t.tolist()}")
        out.append(t)
    if not bool((out[1] > 0).all()):
        raise ValueError(f"normalize sigma must be > 0 for every member, got {out[1].tolist()}")
    return out[0], out[1]


def _group(t: torch.Tensor, group_size: Optional[int]) -> torch.Tensor:
    if group_size is None:
        return t
    return t.reshape(*t.shape[:-1], t.shape[-1] // group_size, group_size)


def _check_group_size(group_size: Optional[int], n: int) -> None:
    if group_size is None:
        return
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if n % group_size:
        raise ValueError(f"group_size={group_size} must divide the number of samples N={n}")


# ---- ensemble_reduce ----------------------------------------------------------------------------------


def ensemble_reduce(
    scores: ArrayLike,
    method: str = "mean",
    lam: float = 0.5,
    ddof: int = 0,
    normalize: Normalize = None,
    *,
    group_size: Optional[int] = None,
    check_finite: bool = True,
    backend: str = "auto",
) -> EnsembleScores:
    """Combine the scores of K ensemble members per sample (Coste et al., LOSSES.md section E).

    With members optionally normalised as ``(s_k - mu_k) / sigma_k``, per sample n:
    ``mean = 1/K sum_k s_k``, ``var = 1/(K - ddof) sum_k (s_k - mean)^2`` and

    - ``"mean"``: ``combined = mean`` (not conservative);
    - ``"wco"``: worst-case optimisation, ``combined = min_k s_k``;
    - ``"uwo"``: uncertainty-weighted optimisation, ``combined = mean - lam * var`` (variance, not std;
      the paper uses ``lam=0.5, ddof=0`` for best-of-n and ``lam=0.1`` for PPO).

    Parameters
    ----------
    scores : [K, N] torch tensor or numpy array (float32 / bfloat16 / float16; float64 on the torch
        backend), one row per member. Differentiable for torch inputs.
    method : ``"mean"``, ``"wco"`` or ``"uwo"``.
    lam : UWO variance weight (>= 0; ignored by the other methods).
    ddof : 0 for the population variance (the paper), 1 for the unbiased one (Coste et al.'s PPO code).
    normalize : None, or ``(mu, sigma)``, each [K] (tensor, array or sequence), e.g. from
        ``calibration_stats``; applied before the reduction.
    group_size : n: return [P, n] (best-of-n groups of n consecutive samples) instead of [N].
    check_finite : raise ValueError on NaN/Inf scores (one host synchronisation; off for sync-free loops).
        Unchecked, a NaN member makes ``combined``, ``mean`` and ``var`` NaN for every method (``wco``
        included) on every backend, so that it cannot win a best-of-n selection.
    backend : ``"auto"`` (Triton on CUDA, native C++ on the CPU), ``"native"``, ``"triton"``, ``"cuda"`` (the
        CUDA C++ kernel), ``"torch"`` (see ``prefkern.info()``).

    Returns
    -------
    EnsembleScores with ``combined``, ``mean``, ``var`` ([N] or [P, n], fp32 or float64); numpy arrays
    when ``scores`` was a numpy array.

    Raises
    ------
    TypeError for unsupported types or dtypes; ValueError for a wrong shape, K <= ddof, NaN/Inf scores,
    bad normalisation statistics, an unknown method or a group size that does not divide N.
    """
    scores, as_numpy = _as_tensor("scores", scores)
    check_float("scores", scores, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [K, N] (members x samples), got {tuple(scores.shape)}")
    k, n = scores.shape
    if k == 0:
        raise ValueError("scores must have at least one member (K >= 1), got shape " + str(tuple(scores.shape)))
    code = _method_code(method)
    _check_lam_ddof(lam, ddof, k)
    _check_group_size(group_size, n)
    backend = float64_backend("scores", scores, backend)
    compute = torch.float64 if scores.dtype == torch.float64 else torch.float32
    mu, sigma = _normalization(normalize, k, scores.device, compute)
    if n > 1 and scores.stride(1) != 1:
        scores = scores.contiguous()
    out = EnsembleScores(*ensemble_reduce_fwd(scores, mu, sigma, code, float(lam), int(ddof), check_finite, backend))
    out = out._map(lambda t: _group(t, group_size))
    return out._map(lambda t: t.detach().cpu().numpy()) if as_numpy else out


def calibration_stats(scores: ArrayLike, ddof: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-member mean and standard deviation of scores on a reference set, for ``normalize=``.

    Parameters
    ----------
    scores : [K, M] scores of each member on the same M reference samples (M > ddof).

    Returns
    -------
    (mu [K], sigma [K]) float64 tensors on the scores' device.
    """
    t, _ = _as_tensor("scores", scores)
    if t.dim() != 2 or t.shape[1] <= ddof:
        raise ValueError(f"scores must have shape [K, M] with M > ddof={ddof}, got {tuple(t.shape)}")
    t = t.detach().double()
    return t.mean(dim=1), t.std(dim=1, correction=ddof)


# ---- Bradley-Terry training of the members ---------------------------------------------------------


def bootstrap_weights(
    num_members: int, num_pairs: int, generator: Optional[torch.Generator] = None, device: Any = None
) -> torch.Tensor:
    """[K, B] float32 bootstrap counts: member k sees pair b ``w[k, b]`` times (B draws with replacement).

    Each row sums to B. Pass it to ``bradley_terry_loss(weights=...)`` so that every member trains on
    its own resample of the batch (ensemble diversity beyond the initialisation seed).
    """
    if num_members < 1 or num_pairs < 1:
        raise ValueError(f"num_members and num_pairs must be >= 1, got {num_members}, {num_pairs}")
    gen_device = generator.device if generator is not None else device
    idx = torch.randint(0, num_pairs, (num_members, num_pairs), generator=generator, device=gen_device)
    counts = torch.zeros(num_members, num_pairs, device=gen_device).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
    return counts.to(device) if device is not None else counts


def bradley_terry_loss(
    member_scores: torch.Tensor, weights: Optional[torch.Tensor] = None, *, per_member: bool = False
) -> torch.Tensor:
    """Bradley-Terry pairwise loss of each member on a ``[chosen; rejected]`` batch.

    ``loss_k = sum_b w[k, b] * softplus(-(s[k, b] - s[k, B + b])) / sum_b w[k, b]``, i.e.
    ``-log sigmoid(r_chosen - r_rejected)`` averaged over the pairs the member sees.

    Parameters
    ----------
    member_scores : [K, 2B] scores; columns 0..B-1 are the chosen completions, B..2B-1 the rejected ones
        (TRL's stacking).
    weights : optional [K, B] non-negative pair weights per member (``bootstrap_weights``); default all 1.
    per_member : return the [K] member losses instead of their mean.

    Returns
    -------
    scalar (mean over members) or [K] loss in the scores' dtype.
    """
    if not isinstance(member_scores, torch.Tensor) or member_scores.dim() != 2 or member_scores.shape[1] % 2:
        shape = tuple(member_scores.shape) if isinstance(member_scores, torch.Tensor) else type(member_scores).__name__
        raise ValueError(f"member_scores must be a [K, 2B] tensor ([chosen; rejected] columns), got {shape}")
    k, two_b = member_scores.shape
    b = two_b // 2
    if b == 0:
        raise ValueError("member_scores must hold at least one pair (2B >= 2 columns)")
    per_pair = nn.functional.softplus(member_scores[:, b:] - member_scores[:, :b])
    if weights is None:
        losses = per_pair.mean(dim=1)
    else:
        if weights.shape != (k, b):
            raise ValueError(f"weights must have shape [K, B] = [{k}, {b}], got {tuple(weights.shape)}")
        w = weights.to(per_pair.dtype)
        losses = (per_pair * w).sum(dim=1) / w.sum(dim=1).clamp(min=torch.finfo(w.dtype).tiny)
    return losses if per_member else losses.mean()


# ---- fused heads ------------------------------------------------------------------------------------


def _last_positions(
    t: int, b: int, device: torch.device, attention_mask: Optional[torch.Tensor], lengths: Optional[ArrayLike],
    padding_side: str, validate: bool = True,
) -> torch.Tensor:
    """[B] int64 positions to score. ``validate=False`` skips the checks that need a host synchronisation
    and clamps instead (a row without a real token scores position 0, lengths are clamped into [1, T])."""
    if attention_mask is not None and lengths is not None:
        raise ValueError("pass attention_mask or lengths, not both")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (b, t):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must be a [B, T] = [{b}, {t}] tensor, got {shape}")
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but hidden is on {device}")
        last = reference.last_token_index(attention_mask)
        if not validate:
            return last.clamp(min=0)
        if b and bool((last < 0).any()):
            raise ValueError(f"attention_mask row {int((last < 0).nonzero()[0, 0])} has no real token")
        return last
    if lengths is not None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if isinstance(lengths, np.ndarray):
            lengths = torch.from_numpy(lengths)
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (b,) or lengths.is_floating_point():
            raise ValueError(f"lengths must be an integer tensor of shape [B] = [{b}]")
        lengths = lengths.to(device=device, dtype=torch.int64)
        if not validate:
            lengths = lengths.clamp(1, t)
        elif b and bool(((lengths < 1) | (lengths > t)).any()):
            raise ValueError(f"lengths must lie in [1, T={t}], got {lengths.tolist()[:16]}")
        return lengths - 1 if padding_side == "right" else torch.full_like(lengths, t - 1)
    return torch.full((b,), t - 1, dtype=torch.int64, device=device)


def _check_member_vector(name: str, v: Optional[torch.Tensor], k: int) -> None:
    if v is None:
        return
    check_tensor(name, v)
    if not v.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {v.dtype}")
    if tuple(v.shape) != (k,):
        raise ValueError(f"{name} must have shape [K] = [{k}], got {tuple(v.shape)}")


def ensemble_head(
    hidden: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    lengths: Optional[ArrayLike] = None,
    padding_side: str = "right",
    mu: Optional[torch.Tensor] = None,
    sigma: Optional[torch.Tensor] = None,
    method: str = "mean",
    lam: float = 0.5,
    ddof: int = 0,
    group_size: Optional[int] = None,
    check_finite: bool = True,
    backend: str = "auto",
) -> EnsembleScores:
    """K linear reward heads on the last real token of every sequence, reduced over the members, fused.

    Gathers ``x_b = hidden[b, last_b]``, computes the raw member scores ``s[k, b] = weight[k] . x_b +
    bias[k]`` and reduces them as :func:`ensemble_reduce` does (after ``(s - mu) / sigma`` when given), in
    ONE kernel (Triton on CUDA by default, the CUDA C++ kernel with ``backend="cuda"``, native C++ on the
    CPU). Positions other than ``last_b`` are never read, in the forward or the backward: a padded
    position cannot change a score or a gradient, even if it holds NaN.

    Parameters
    ----------
    hidden : [B, T, H] last hidden states (float32 / bfloat16 / float16; float64 on the torch backend).
    attention_mask : [B, T] or None, nonzero on real tokens; the last nonzero position of each row is
        scored, so left and right padding both work.
    weight : [K, H] member weights (cast to ``hidden``'s dtype), on ``hidden``'s device.
    bias : [K] or None.
    lengths : [B] integer sequence lengths instead of a mask; with ``padding_side="right"`` the token
        at ``lengths - 1`` is scored, with ``"left"`` the token at ``T - 1``. With neither a mask nor
        lengths, the token at ``T - 1`` is scored.
    mu, sigma : [K] each, or None: per-member calibration statistics (``calibration_stats``); members
        enter the reduction as ``(s - mu) / sigma``. ``mu = 0, sigma = 1`` leaves them unchanged exactly.
    method, lam, ddof : the reduction (see :func:`ensemble_reduce`).
    group_size : n: shape the outputs [P, n] (best-of-n groups of n consecutive sequences).
    check_finite : raise ValueError when a member score is NaN or Inf, a mask row has no real token or a
        length lies outside [1, T] (host synchronisations). False makes the call free of host syncs:
        positions are clamped instead (an empty mask row scores position 0), and a NaN member score
        makes that sequence's ``combined``, ``mean`` and ``var`` NaN.
    backend : ``"auto"``, ``"native"``, ``"triton"``, ``"cuda"``, ``"torch"``.

    Returns
    -------
    EnsembleScores: ``combined``, ``mean``, ``var`` [B] (or [P, n]) and raw member ``scores`` [K, B]
    (or [K, P, n]), fp32 (float64 for float64 hidden states), differentiable with respect to
    ``hidden``, ``weight`` and ``bias``.
    """
    check_tensor("hidden", hidden)
    check_float("hidden", hidden, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    check_tensor("weight", weight)
    check_ndim("weight", weight, 2, "[K, H]")
    if not weight.is_floating_point():
        raise TypeError(f"weight must have a floating dtype, got {weight.dtype}")
    k, h = weight.shape
    if k == 0:
        raise ValueError("weight must hold at least one member (K >= 1), got shape " + str(tuple(weight.shape)))
    if hidden.dim() != 3 or hidden.shape[2] != h:
        raise ValueError(f"hidden must have shape [B, T, H] with H = {h}, got {tuple(hidden.shape)}")
    _check_member_vector("bias", bias, k)
    _check_member_vector("mu", mu, k)
    _check_member_vector("sigma", sigma, k)
    if (mu is None) != (sigma is None):
        raise ValueError("mu and sigma must be given together (or neither)")
    code = _method_code(method)
    _check_lam_ddof(lam, ddof, k)
    b, t, _ = hidden.shape
    if t == 0:
        raise ValueError("hidden must have at least one position (T >= 1)")
    check_same_device(hidden=hidden, weight=weight, bias=bias, mu=mu, sigma=sigma)
    _check_group_size(group_size, b)
    last = _last_positions(t, b, hidden.device, attention_mask, lengths, padding_side, check_finite)
    backend = float64_backend("hidden", hidden, backend)
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if hidden.stride(2) != 1:
        hidden = hidden.contiguous()
    weight = weight.to(hidden.dtype)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    bias = None if bias is None else bias.to(compute)
    mu = None if mu is None else mu.to(compute)
    sigma = None if sigma is None else sigma.to(compute)
    scores, combined, mean, var = ensemble_head_fwd(
        hidden, last.contiguous(), weight, bias, mu, sigma, code, float(lam), int(ddof), check_finite, backend
    )
    return EnsembleScores(combined, mean, var, scores)._map(lambda x: _group(x, group_size))


class EnsembleRewardHead(nn.Module):
    """K scalar reward heads on one backbone, stored as one [K, H] weight, fused with the reduction.

    ``forward`` calls :func:`ensemble_head` with the module's parameters and buffers: it gathers the last
    real token of every sequence, applies all K heads and reduces them in ONE kernel; gradients flow to
    the heads and the hidden states.

    Parameters
    ----------
    hidden_size : H
    num_members : K (4-5 recommended by Coste et al.)
    bias : learn a bias per member
    method, lam, ddof : default reduction (see ``ensemble_reduce``); overridable per call
    backend : ``"auto"``, ``"native"``, ``"triton"``, ``"cuda"``, ``"torch"``
    check_finite : raise ValueError when a member score is NaN or Inf, a mask row has no real token or a
        length lies outside [1, T] (host synchronisations). False makes ``forward`` free of host syncs for
        generation loops: positions are clamped instead (an empty mask row scores position 0).

    Buffers ``norm_mean`` and ``norm_std`` ([K], float64) always exist and are saved in the state dict:
    0 and 1 (the identity, exact) until ``set_normalization`` or ``calibrate`` stores calibration
    statistics, so that a state dict round trips between calibrated and uncalibrated heads in every
    direction. A state dict saved before these buffers were always present loads with the identity.
    """

    def __init__(
        self, hidden_size: int, num_members: int, bias: bool = True, *, method: str = "mean", lam: float = 0.5,
        ddof: int = 0, backend: str = "auto", check_finite: bool = True, device: Any = None, dtype: Any = None,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or num_members < 1:
            raise ValueError(f"hidden_size and num_members must be >= 1, got {hidden_size}, {num_members}")
        _method_code(method)
        _check_lam_ddof(lam, ddof, num_members)
        self.hidden_size, self.num_members = hidden_size, num_members
        self.method, self.lam, self.ddof, self.backend, self.check_finite = method, lam, ddof, backend, check_finite
        self.weight = nn.Parameter(torch.empty(num_members, hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_members, device=device, dtype=dtype)) if bias else None
        self.register_buffer("norm_mean", torch.zeros(num_members, dtype=torch.float64, device=device))
        self.register_buffer("norm_std", torch.ones(num_members, dtype=torch.float64, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, independently for every member (different heads, different draws)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_members={self.num_members}, bias={self.bias is not None}, "
                f"method={self.method!r}, lam={self.lam}, ddof={self.ddof}")

    def _apply(self, fn, *args, **kwargs):
        # module.to(dtype) / .bfloat16() cast floating buffers; the calibration statistics stay float64
        # (a bf16 mu would shift every normalised score), and only follow the device.
        stats = (self.norm_mean, self.norm_std)
        out = super()._apply(fn, *args, **kwargs)
        self.norm_mean = stats[0].to(device=self.norm_mean.device)
        self.norm_std = stats[1].to(device=self.norm_std.device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # state dicts of uncalibrated heads saved before the buffers were always present lack both keys
        if prefix + "norm_mean" not in state_dict and prefix + "norm_std" not in state_dict:
            state_dict[prefix + "norm_mean"] = torch.zeros_like(self.norm_mean)
            state_dict[prefix + "norm_std"] = torch.ones_like(self.norm_std)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def calibrated(self) -> bool:
        """Whether calibration statistics other than the identity (mu 0, sigma 1) are set (one host sync)."""
        return bool((self.norm_mean != 0).any() or (self.norm_std != 1).any())

    @torch.no_grad()
    def set_normalization(self, mu: Any, sigma: Any) -> None:
        """Store per-member calibration statistics ([K] each); ``None, None`` resets them to the identity."""
        if mu is None and sigma is None:
            self.norm_mean.zero_()
            self.norm_std.fill_(1.0)
            return
        mu_t, sigma_t = _normalization((mu, sigma), self.num_members, self.norm_mean.device, torch.float64)
        self.norm_mean.copy_(mu_t)
        self.norm_std.copy_(sigma_t)

    @torch.no_grad()
    def calibrate(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> None:
        """Set the normalisation from the members' raw scores on a reference batch (mean and population std)."""
        scores = self(hidden, attention_mask, **kwargs).scores  # raw scores do not depend on the normalisation
        self.set_normalization(*calibration_stats(scores.reshape(self.num_members, -1)))

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        lengths: Optional[ArrayLike] = None,
        padding_side: str = "right",
        group_size: Optional[int] = None,
        method: Optional[str] = None,
        lam: Optional[float] = None,
        ddof: Optional[int] = None,
        backend: Optional[str] = None,
    ) -> EnsembleScores:
        """Score each sequence with all K heads and reduce: :func:`ensemble_head` with this module's
        weight, bias and calibration buffers.

        Parameters
        ----------
        hidden : [B, T, H] last hidden states (float32 / bfloat16 / float16; float64 on the torch backend).
        attention_mask : [B, T], nonzero on real tokens (see :func:`ensemble_head`).
        lengths, padding_side, group_size : see :func:`ensemble_head`.
        method, lam, ddof, backend : override the module's defaults for this call.

        Returns
        -------
        EnsembleScores: ``combined``, ``mean``, ``var`` [B] (or [P, n]) and raw member ``scores`` [K, B]
        (or [K, P, n]), fp32 (float64 for float64 hidden states), differentiable.
        """
        return ensemble_head(
            hidden, attention_mask, self.weight, self.bias, lengths=lengths, padding_side=padding_side,
            mu=self.norm_mean, sigma=self.norm_std, method=self.method if method is None else method,
            lam=self.lam if lam is None else lam, ddof=self.ddof if ddof is None else ddof, group_size=group_size,
            check_finite=self.check_finite, backend=self.backend if backend is None else backend,
        )

    def pairwise_loss(
        self,
        hidden: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        lengths: Optional[ArrayLike] = None,
        padding_side: str = "right",
        bootstrap: bool = False,
        generator: Optional[torch.Generator] = None,
        per_member: bool = False,
    ) -> torch.Tensor:
        """Bradley-Terry loss of every head on a ``[chosen; rejected]`` batch of 2B sequences.

        With ``bootstrap=True`` each member trains on its own resample of the B pairs
        (``bootstrap_weights``, drawn from ``generator``). Returns the mean over members (or [K]).
        """
        if hidden.dim() != 3 or hidden.shape[0] % 2:
            raise ValueError(f"hidden must be [2B, T, H] with [chosen; rejected] rows, got {tuple(hidden.shape)}")
        scores = self(hidden, attention_mask, lengths=lengths, padding_side=padding_side).scores
        weights = None
        if bootstrap:
            weights = bootstrap_weights(self.num_members, hidden.shape[0] // 2, generator).to(scores.device)
        return bradley_terry_loss(scores, weights, per_member=per_member)
