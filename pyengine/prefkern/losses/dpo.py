"""Family A: TRL ``DPOTrainer`` losses (LOSSES.md section A), as functions of sequence log-probs.

Two generations of TRL are supported through ``trl_version``:

* ``"0.29"`` (default; also any later version such as ``"1.9"``): the refactored
  ``DPOTrainer._compute_loss`` -- f-divergence scores enter most loss types,
  ``ipo``/``sigmoid_norm`` length-average inside their branch (lengths clamped
  at 1), WPO weights multiply every loss entry without clamp, no label
  smoothing on ``sigmoid``, ``exo_pair`` refuses ``label_smoothing == 0``,
  ``bco_pair`` has no running-mean shift, no ``rpo_alpha``/``reference_free``.
* ``"0.28"`` (or lower): ``DPOTrainer.dpo_loss`` -- ``sigmoid`` is cDPO under
  ``label_smoothing``, ``"ipo"`` in the list length-averages *all* log-probs
  (and the logged rewards), the f-transform only changes the margin of
  ``sigmoid``/``robust``/``exo_pair``/``hinge``/``ipo``, ``rpo_alpha`` and
  ``reference_free`` exist, ``bco_pair`` uses a running reward mean
  (:class:`BCORunningMean`), WPO weight clamped at 1 and applied once.

Not reproduced from <= 0.28 (LOSSES.md H.6, readings of code that were never executed): the
``ignore_index=0`` quirk of the NLL term (pass the NLL you want as ``chosen_nll``), the one-token
offset of the WPO weight, and LD-DPO's indexing from the start of the whole row
(:func:`ld_sequence_logps` counts completion positions).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._common import finish, logsig, normalize_loss_types, pair_metrics, parse_trl_version, smoothed_sigmoid_loss
from .._validation import check_number, lengths_input, scalar_input, sequence_inputs
from .outputs import PreferenceLossOutput

__all__ = ["DPO_LOSS_TYPES", "F_DIVERGENCE_TYPES", "BCORunningMean", "dpo_loss", "f_divergence_scores"]

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    "cdpo",  # prefkern: explicit cDPO (= <=0.28 sigmoid with label_smoothing) in either generation
)
_ALIASES = {"aot_pair": "aot_unpaired"}
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
EXO_DEFAULT_EPS = 1e-3

_LEGACY_UNSUPPORTED = ("sigmoid_norm",)
_WEIGHTING_FORBIDDEN = ("aot", "aot_unpaired")
_NEEDS_REF_EVEN_IF_FREE = ("nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "discopop")


@dataclass
class BCORunningMean:
    """Running mean of the implicit rewards used by legacy (<= 0.28) ``bco_pair``.

    Mirrors TRL's ``RunningMoments`` as used by ``dpo_loss``: once per step it is
    updated with one scalar, the batch mean of ``[beta*a_1..beta*a_B, beta*b_1..beta*b_B]``,
    *before* the loss reads it; ``count`` starts at 1e-24 so that after the first
    step ``mean`` equals the first batch mean. The object is mutated in place by
    :func:`dpo_loss`; keep one per training run (and checkpoint it).

    Attributes
    ----------
    mean : float
        Current running mean (the shift ``r_bar``).
    count : float
        Number of updates so far (starts at 1e-24).
    """

    mean: float = 0.0
    count: float = 1e-24

    def update(self, value: float) -> None:
        """Fold one scalar observation into the running mean."""
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("BCORunningMean.update got a non-finite value")
        tot = self.count + 1.0
        self.mean += (value - self.mean) * 1.0 / tot
        self.count = tot


def _alpha_cap(orig_dtype: torch.dtype) -> float:
    return 11.0 if orig_dtype == torch.float16 else 80.0


def f_divergence_scores(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    *,
    input_dtype: Optional[torch.dtype] = None,
) -> tuple:
    """Score transform ``psi`` of TRL >= 0.29 (LOSSES.md A.6).

    Parameters
    ----------
    chosen_logratios, rejected_logratios : torch.Tensor
        ``a = S_theta(y_w) - S_ref(y_w)`` and ``b``, ``[B]``.
    f_divergence_type : str
        ``"reverse_kl"`` (``psi(u) = u``), ``"forward_kl"`` (``-exp(-u)``),
        ``"js_divergence"`` (``log sigma(u)``) or ``"alpha_divergence"``
        (``exp((alpha-1) u) / (alpha-1)``, exponent clamped at 80, or 11 for fp16
        inputs; ``alpha == 1`` is reverse KL).
    f_alpha_divergence_coef : float
        ``alpha`` of the alpha-divergence.
    input_dtype : torch.dtype, optional
        Original dtype of the inputs (selects the fp16 clamp).

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``s_w = psi(a)``, ``s_l = psi(b)``, ``[B]``.
    """
    a, b = chosen_logratios, rejected_logratios
    if f_divergence_type == "reverse_kl":
        return a, b
    if f_divergence_type == "forward_kl":
        return -torch.exp(-a), -torch.exp(-b)
    if f_divergence_type == "js_divergence":
        return logsig(a), logsig(b)
    if f_divergence_type == "alpha_divergence":
        alpha = float(f_alpha_divergence_coef)
        if alpha == 1.0:
            return a, b
        cap = _alpha_cap(input_dtype if input_dtype is not None else a.dtype)
        return (torch.exp(torch.clamp((alpha - 1.0) * a, max=cap)) / (alpha - 1.0),
                torch.exp(torch.clamp((alpha - 1.0) * b, max=cap)) / (alpha - 1.0))
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}")


def _cap_exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(torch.clamp(x, max=math.log(torch.finfo(x.dtype).max)))


def _discopop(z: torch.Tensor, tau: float) -> torch.Tensor:
    # (1 - mu) * (-log sigma(z)) + mu * exp(-z), mu = sigma(z / tau); mu * exp(-z) as exp(log mu - z) so that
    # very negative z does not give 0 * inf.
    return torch.sigmoid(-z / tau) * (-logsig(z)) + torch.exp(logsig(z / tau) - z)


def _exo(z: torch.Tensor, eps: float) -> torch.Tensor:
    q = torch.sigmoid(z)
    return q * (logsig(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (logsig(-z) - math.log(eps))


def _robust(z: torch.Tensor, eps: float) -> torch.Tensor:
    return ((1.0 - eps) * (-logsig(z)) - eps * (-logsig(-z))) / (1.0 - 2.0 * eps)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor],
    ref_rejected_logps: Optional[torch.Tensor],
    *,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: Optional[float] = None,
    discopop_tau: float = 0.05,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    chosen_nll: Optional[torch.Tensor] = None,
    chosen_weights: Optional[torch.Tensor] = None,
    rejected_weights: Optional[torch.Tensor] = None,
    rpo_alpha: Optional[float] = None,
    reference_free: bool = False,
    bco_running_mean: Optional[BCORunningMean] = None,
    trl_version: str = "0.29",
) -> PreferenceLossOutput:
    """Every TRL ``DPOTrainer`` loss type (LOSSES.md A.1-A.8).

    Parameters
    ----------
    policy_chosen_logps, policy_rejected_logps : torch.Tensor
        ``[B]`` summed policy log-probs ``S_theta(y_w)``, ``S_theta(y_l)`` (the two
        halves of a ``[chosen; rejected]`` batch; see :func:`preference_batch`).
        For LD-DPO pass :func:`ld_sequence_logps` sums.
    ref_chosen_logps, ref_rejected_logps : torch.Tensor or None
        ``[B]`` summed reference log-probs (detached here). ``None`` only with
        ``reference_free=True`` (<= 0.28) or when ``loss_type`` is only ``"sft"``.
    loss_type : str or list of str, default "sigmoid"
        One of :data:`DPO_LOSS_TYPES` (``"aot_pair"`` is accepted as the old name
        of ``"aot_unpaired"``), or a list whose entries are combined
        ``L = sum_k w_k mean_b l_k`` (A.8).
    loss_weights : list of float, optional
        One weight per entry of ``loss_type`` (default 1.0 each).
    beta : float, default 0.1
        ``beta`` (for ``ipo`` the paper's ``tau``). Must be > 0.
    label_smoothing : float, default 0.0
        ``epsilon`` for ``robust`` (in ``[0, 0.5)``), ``exo_pair`` (> 0; >= 0.29
        raises at 0, <= 0.28 silently uses 1e-3 for the whole list), ``aot*``,
        ``cdpo``, and ``sigmoid`` in <= 0.28 only (cDPO).
    f_divergence_type : str, default "reverse_kl"
        See :func:`f_divergence_scores`; ``"forward_kl"`` is >= 0.29 only.
    f_alpha_divergence_coef : float, optional
        Alpha-divergence coefficient; default 0.5 (>= 0.29) or 1.0 (<= 0.28,
        where it is the legacy ``alpha' = 1 - alpha`` parameterisation).
    discopop_tau : float, default 0.05
        DiscoPOP temperature ``tau`` (> 0).
    chosen_lengths, rejected_lengths : torch.Tensor, optional
        ``[B]`` completion token counts; required for ``ipo`` and ``sigmoid_norm``.
    chosen_nll : torch.Tensor, optional
        0-d token-mean NLL of the chosen completions (:func:`chosen_nll`);
        required for ``sft`` and ``rpo_alpha``.
    chosen_weights, rejected_weights : torch.Tensor, optional
        ``[B]`` WPO sequence weights (:func:`wpo_sequence_weights`); the pair
        weight is their product (>= 0.29: no clamp, on every entry; <= 0.28:
        ``min(1, .)`` on the summed loss).
    rpo_alpha : float, optional
        <= 0.28 only: adds ``rpo_alpha * NLL`` to every pair (use
        ``loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]`` in >= 0.29).
    reference_free : bool, default False
        <= 0.28 only: zero reference in the margins of ``sigmoid``, ``robust``,
        ``exo_pair``, ``hinge``, ``ipo``, ``apo_*`` and the f-transform.
    bco_running_mean : BCORunningMean, optional
        Required for ``bco_pair`` under <= 0.28; updated in place.
    trl_version : str, default "0.29"
        ``"0.29"`` (current TRL, also v1.x) or ``"0.28"`` (legacy ``dpo_loss``).

    Returns
    -------
    PreferenceLossOutput
        ``loss`` (0-d), ``losses`` ``[B]`` (weighted sum over the entries; for
        ``aot*`` in sorted-slot order), ``chosen_rewards = beta * a``,
        ``rejected_rewards = beta * b`` (``[B]``, detached; <= 0.28: weighted sum
        over entries, length-averaged when ``"ipo"`` is listed) and metrics
        ``rewards/{chosen,rejected,margins,accuracies}``, ``logps/{chosen,rejected}``
        (+ ``nll_loss`` when an NLL is used).
    """
    current = parse_trl_version(trl_version)
    types = normalize_loss_types(loss_type, DPO_LOSS_TYPES, _ALIASES, "DPO")
    if loss_weights is None:
        weights: List[float] = [1.0] * len(types)
    else:
        if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(types):
            raise ValueError(f"loss_weights must be a list with one weight per loss_type entry ({len(types)})")
        weights = [check_number("loss_weights[i]", w) for w in loss_weights]
    beta = check_number("beta", beta, low=0.0, low_open=True)
    eps = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    tau = check_number("discopop_tau", discopop_tau, low=0.0, low_open=True)
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}")
    if f_alpha_divergence_coef is None:
        f_alpha = 0.5 if current else 1.0
    else:
        f_alpha = check_number("f_alpha_divergence_coef", f_alpha_divergence_coef)

    only_sft = all(t == "sft" for t in types)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
        if not (only_sft or reference_free):
            raise ValueError(f"loss_type {list(types)} needs ref_chosen_logps and ref_rejected_logps ([B] each)")
        if reference_free:
            bad = [t for t in types if t in _NEEDS_REF_EVEN_IF_FREE]
            if bad:
                raise ValueError(f"{bad} read the reference log-probs even with reference_free=True; pass them")

    pc, pr, rc, rr, cw, rw = sequence_inputs([
        ("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps),
        ("chosen_weights", chosen_weights), ("rejected_weights", rejected_weights),
    ])
    orig_dtype = policy_chosen_logps.dtype
    if rc is None:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    rc, rr = rc.detach(), rr.detach()
    if (cw is None) != (rw is None):
        raise ValueError("pass both chosen_weights and rejected_weights (WPO), or neither")
    use_weighting = cw is not None
    if use_weighting:
        cw, rw = cw.detach(), rw.detach()
        if current and any(t in _WEIGHTING_FORBIDDEN for t in types):
            raise ValueError("WPO weighting (chosen_weights/rejected_weights) is not allowed with aot/aot_unpaired")
    lc = lr = None
    if chosen_lengths is not None or rejected_lengths is not None:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
        lc = lengths_input("chosen_lengths", chosen_lengths, pc)
        lr = lengths_input("rejected_lengths", rejected_lengths, pc)
    if any(t in ("ipo", "sigmoid_norm") for t in types) and lc is None:
        raise ValueError("loss_type 'ipo'/'sigmoid_norm' needs chosen_lengths and rejected_lengths ([B] token counts)")
    nll = None
    needs_nll = "sft" in types or rpo_alpha is not None
    if needs_nll:
        if chosen_nll is None:
            raise ValueError("loss_type 'sft' / rpo_alpha need chosen_nll (0-d token-mean NLL, see chosen_nll())")
        nll = scalar_input("chosen_nll", chosen_nll, pc)
    if "robust" in types and not (0.0 <= eps < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5) for 'robust' (it divides by 1 - 2*eps), got {eps}")

    kw = dict(beta=beta, eps=eps, tau=tau, f_type=f_divergence_type, f_alpha=f_alpha, types=types,
              weights=weights, pc=pc, pr=pr, rc=rc, rr=rr, lc=lc, lr=lr, nll=nll, cw=cw, rw=rw,
              orig_dtype=orig_dtype)
    if current:
        if rpo_alpha is not None:
            raise ValueError("rpo_alpha was removed in TRL 0.29; use loss_type=['sigmoid', 'sft'], "
                             "loss_weights=[1.0, rpo_alpha] (or trl_version='0.28')")
        if reference_free:
            raise ValueError("reference_free was removed in TRL 0.29; use cpo_loss/simpo_loss for reference-free "
                             "objectives (or trl_version='0.28')")
        return _dpo_current(**kw)
    if bco_running_mean is None and "bco_pair" in types:
        raise ValueError("legacy (<=0.28) bco_pair needs bco_running_mean=BCORunningMean() (explicit running state)")
    if rpo_alpha is not None:
        check_number("rpo_alpha", rpo_alpha)
    return _dpo_legacy(rpo_alpha=rpo_alpha, reference_free=reference_free, bco=bco_running_mean, **kw)


def _dpo_current(*, beta, eps, tau, f_type, f_alpha, types, weights, pc, pr, rc, rr, lc, lr, nll, cw, rw,
                 orig_dtype) -> PreferenceLossOutput:
    if "exo_pair" in types and eps == 0.0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    if "sigmoid" in types and eps > 0.0:
        warnings.warn("label_smoothing has no effect on 'sigmoid' in TRL >= 0.29; use loss_type='cdpo' "
                      "or trl_version='0.28' for cDPO", stacklevel=3)
    a, b = pc - rc, pr - rr
    sw, sl = f_divergence_scores(a, b, f_type, f_alpha, input_dtype=orig_dtype)
    delta = sw - sl
    pair_w = cw * rw if cw is not None else None
    total_losses = torch.zeros_like(pc)
    loss = pc.new_zeros(())
    for t, w in zip(types, weights):
        if t == "sigmoid":
            lk = -logsig(beta * delta)
        elif t == "cdpo":
            lk = smoothed_sigmoid_loss(beta * delta, eps)
        elif t == "hinge":
            lk = torch.relu(1.0 - beta * delta)
        elif t in ("ipo", "sigmoid_norm"):
            h = sw / lc.clamp(min=1) - sl / lr.clamp(min=1)
            lk = (h - 1.0 / (2.0 * beta)) ** 2 if t == "ipo" else -logsig(beta * h)
        elif t == "exo_pair":
            lk = _exo(beta * delta, eps)
        elif t == "nca_pair":
            lk = -logsig(beta * sw) - 0.5 * logsig(-beta * sw) - 0.5 * logsig(-beta * sl)
        elif t == "robust":
            lk = _robust(beta * delta, eps)
        elif t == "bco_pair":
            lk = -logsig(beta * sw) - logsig(-beta * sl)
        elif t == "sppo_hard":
            lk = (sw - 0.5 / beta) ** 2 + (sl + 0.5 / beta) ** 2
        elif t == "aot":
            d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
            lk = smoothed_sigmoid_loss(beta * d, eps)
        elif t == "aot_unpaired":
            d = torch.sort(a).values - torch.sort(b).values
            lk = smoothed_sigmoid_loss(beta * d, eps)
        elif t == "apo_zero":
            lk = 1.0 - torch.sigmoid(beta * a) + torch.sigmoid(beta * b)
        elif t == "apo_down":
            lk = torch.sigmoid(beta * a) + 1.0 - torch.sigmoid(beta * delta)
        elif t == "discopop":
            lk = _discopop(beta * delta, tau)
        elif t == "sft":
            lk = nll.expand_as(pc)
        else:  # pragma: no cover - normalize_loss_types guards this
            raise ValueError(t)
        if pair_w is not None:
            lk = lk * pair_w
        total_losses = total_losses + w * lk
        loss = loss + w * lk.mean()
    chosen_rewards, rejected_rewards = beta * a.detach(), beta * b.detach()
    metrics = pair_metrics(chosen_rewards, rejected_rewards, pc, pr)
    if nll is not None:
        metrics["nll_loss"] = nll.detach()
    return finish(f"dpo_loss{list(types)}", loss, total_losses, chosen_rewards, rejected_rewards, metrics)


def _dpo_legacy(*, beta, eps, tau, f_type, f_alpha, types, weights, pc, pr, rc, rr, lc, lr, nll, cw, rw,
                orig_dtype, rpo_alpha, reference_free, bco) -> PreferenceLossOutput:
    if f_type == "forward_kl":
        raise ValueError("f_divergence_type='forward_kl' does not exist in TRL <= 0.28")
    bad = [t for t in types if t in _LEGACY_UNSUPPORTED]
    if bad:
        raise ValueError(f"loss_type {bad} does not exist in TRL <= 0.28")
    if "ipo" in types:
        from .._validation import check_positive_lengths

        check_positive_lengths("chosen_lengths", lc, "legacy ipo (<=0.28 divides every log-prob by its length)")
        check_positive_lengths("rejected_lengths", lr, "legacy ipo (<=0.28 divides every log-prob by its length)")
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    if "exo_pair" in types and eps == 0.0:
        warnings.warn("TRL <= 0.28 replaced label_smoothing=0 by 1e-3 for exo_pair, which also turns any "
                      "'sigmoid' entry into cDPO; reproducing that", stacklevel=3)
        eps = EXO_DEFAULT_EPS
    a, b = pc - rc, pr - rr
    a_rf = pc if reference_free else a
    b_rf = pr if reference_free else b
    if f_type == "alpha_divergence":
        if f_alpha == 0.0:
            raise ValueError("f_alpha_divergence_coef must be != 0 in the <= 0.28 alpha-divergence form")
        margin = (_cap_exp(-f_alpha * b_rf) - _cap_exp(-f_alpha * a_rf)) / f_alpha
    else:
        margin = (pc - pr) - (0.0 if reference_free else (rc - rr))
        if f_type == "js_divergence":
            margin = margin - (F.softplus(a_rf) - F.softplus(b_rf))
    total = torch.zeros_like(pc)
    cr_sum = torch.zeros_like(pc)
    rr_sum = torch.zeros_like(pc)
    r_a, r_b = beta * a.detach(), beta * b.detach()
    for t, w in zip(types, weights):
        if t in ("sigmoid", "cdpo"):
            lk = smoothed_sigmoid_loss(beta * margin, eps)
        elif t == "robust":
            lk = _robust(beta * margin, eps)
        elif t == "exo_pair":
            lk = _exo(beta * margin, eps)
        elif t == "hinge":
            lk = torch.relu(1.0 - beta * margin)
        elif t == "ipo":
            lk = (margin - 1.0 / (2.0 * beta)) ** 2
        elif t == "bco_pair":
            bco.update(float(torch.cat([r_a, r_b]).mean()))
            shift = bco.mean
            lk = -logsig(beta * a - shift) - logsig(-(beta * b - shift))
        elif t == "sppo_hard":
            lk = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
        elif t == "nca_pair":
            lk = -logsig(beta * a) - 0.5 * logsig(-beta * a) - 0.5 * logsig(-beta * b)
        elif t == "aot_unpaired":
            d = torch.sort(a).values - torch.sort(b).values
            lk = smoothed_sigmoid_loss(beta * d, eps)
        elif t == "aot":
            d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
            lk = smoothed_sigmoid_loss(beta * d, eps)
        elif t == "apo_zero":
            lk = 1.0 - torch.sigmoid(beta * a_rf) + torch.sigmoid(beta * b_rf)
        elif t == "apo_down":
            lk = torch.sigmoid(beta * a_rf) + 1.0 - torch.sigmoid(beta * (a_rf - b_rf))
        elif t == "discopop":
            lk = _discopop(beta * ((pc - pr) - (rc - rr)), tau)
        elif t == "sft":
            lk = nll.expand_as(pc)
        else:  # pragma: no cover
            raise ValueError(t)
        total = total + w * lk
        if t != "sft":
            cr_sum = cr_sum + w * r_a
            rr_sum = rr_sum + w * r_b
    if rpo_alpha is not None:
        total = total + rpo_alpha * nll
    if cw is not None:
        total = total * torch.clamp(cw * rw, max=1.0)
    loss = total.mean()
    metrics = pair_metrics(cr_sum, rr_sum, pc, pr)
    if nll is not None:
        metrics["nll_loss"] = nll.detach()
    return finish(f"dpo_loss{list(types)} (trl<=0.28)", loss, total, cr_sum, rr_sum, metrics)
