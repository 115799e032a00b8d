"""CPO and its simpo / alphapo variants (LOSSES.md B.3), TRL ``CPOTrainer``."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ._common import finish, pair_metrics, smoothed_sigmoid_loss
from .._validation import check_number, check_positive_lengths, lengths_input, scalar_input, sequence_inputs
from .outputs import PreferenceLossOutput

__all__ = ["CPO_LOSS_TYPES", "cpo_loss"]

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    chosen_nll: Optional[torch.Tensor] = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> PreferenceLossOutput:
    """CPO / CPO-SimPO / AlphaPO, reference-free (TRL ``CPOTrainer.cpo_loss``).

    Reward ``r(y) = S`` (``alpha == 0``) or AlphaPO ``(1 - e^{-alpha S}) / alpha``,
    with ``S`` summed for ``sigmoid``/``hinge`` and length-averaged for
    ``ipo``/``simpo``/``alphapo``; ``d = r(y_w) - r(y_l)``:

    * ``"sigmoid"``: ``-(1-eps) log sigma(beta d) - eps log sigma(-beta d)``
    * ``"hinge"``: ``max(0, 1 - beta d)`` (SLiC with margin 1/beta)
    * ``"ipo"``: ``(d - 1/(2 beta))^2`` (reference-free, averaged)
    * ``"simpo"``: ``-(1-eps) log sigma(beta d - gamma) - eps log sigma(-(beta d - gamma))``
    * ``"alphapo"``: ``"simpo"`` with ``cpo_alpha = 0`` (TRL config sugar); set ``alpha``.

    Total ``mean_b l + cpo_alpha * NLL`` (NLL skipped when ``cpo_alpha == 0``).

    Parameters
    ----------
    policy_chosen_logps, policy_rejected_logps : torch.Tensor
        ``[B]`` summed policy log-probs.
    chosen_lengths, rejected_lengths : torch.Tensor, optional
        ``[B]`` token counts; required (and > 0) for ``ipo``/``simpo``/``alphapo``.
    chosen_nll : torch.Tensor, optional
        0-d token-mean NLL of the chosen completions; required when ``cpo_alpha != 0``.
    loss_type : str, default "sigmoid"
        One of :data:`CPO_LOSS_TYPES`.
    beta : float, default 0.1
    label_smoothing : float, default 0.0
        Ignored (with a warning) for ``hinge``/``ipo``.
    cpo_alpha : float, default 1.0
        Weight of the NLL (behaviour-cloning) term.
    simpo_gamma : float, default 0.5
        Absolute target margin gamma of ``simpo``/``alphapo``.
    alpha : float, default 0.0
        AlphaPO reward-shape parameter.

    Returns
    -------
    PreferenceLossOutput
        ``losses [B] = l + cpo_alpha * NLL``; rewards ``beta * r(y)``; metrics
        ``rewards/*``, ``logps/*`` (of the inputs the loss used), ``nll_loss``.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected one of {CPO_LOSS_TYPES}")
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    beta = check_number("beta", beta, low=0.0, low_open=True)
    eps = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    cpo_alpha = check_number("cpo_alpha", cpo_alpha)
    gamma = check_number("simpo_gamma", simpo_gamma)
    alpha = check_number("alpha", alpha)
    if eps > 0 and loss_type in ("hinge", "ipo"):
        warnings.warn(f"label_smoothing is ignored for CPO loss_type={loss_type!r}", stacklevel=2)
    pc, pr = sequence_inputs([("policy_chosen_logps", policy_chosen_logps),
                              ("policy_rejected_logps", policy_rejected_logps)])
    if loss_type in ("ipo", "simpo"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"CPO loss_type={loss_type!r} averages log-probs: pass chosen_lengths and rejected_lengths")
        lc = lengths_input("chosen_lengths", chosen_lengths, pc)
        lr = lengths_input("rejected_lengths", rejected_lengths, pc)
        check_positive_lengths("chosen_lengths", lc, f"CPO {loss_type}")
        check_positive_lengths("rejected_lengths", lr, f"CPO {loss_type}")
        sc, sr = pc / lc, pr / lr
    else:
        sc, sr = pc, pr
    if alpha != 0.0:
        rc = -torch.expm1(-alpha * sc) / alpha
        rr = -torch.expm1(-alpha * sr) / alpha
    else:
        rc, rr = sc, sr
    d = rc - rr
    if loss_type == "sigmoid":
        losses = smoothed_sigmoid_loss(beta * d, eps)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * d)
    elif loss_type == "ipo":
        losses = (d - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = smoothed_sigmoid_loss(beta * (d - gamma / beta), eps)
    chosen_rewards, rejected_rewards = beta * rc.detach(), beta * rr.detach()
    metrics = pair_metrics(chosen_rewards, rejected_rewards, sc, sr)
    if cpo_alpha != 0.0:
        if chosen_nll is None:
            raise ValueError("cpo_alpha != 0 needs chosen_nll (0-d token-mean NLL); pass cpo_alpha=0.0 to drop it")
        nll = scalar_input("chosen_nll", chosen_nll, pc)
        losses = losses + cpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return finish(f"cpo_loss({loss_type})", losses.mean(), losses, chosen_rewards, rejected_rewards, metrics)
