"""SimPO (LOSSES.md B.1): reference-free, length-averaged, with a target margin."""
from __future__ import annotations

from typing import Optional

import torch

from ._common import finish, pair_metrics, smoothed_sigmoid_loss
from .._validation import check_number, check_positive_lengths, lengths_input, scalar_input, sequence_inputs
from .outputs import PreferenceLossOutput

__all__ = ["simpo_loss"]


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.25,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    sft_weight: float = 0.0,
    chosen_nll: Optional[torch.Tensor] = None,
) -> PreferenceLossOutput:
    """SimPO loss of ``princeton-nlp/SimPO`` (``SimPOTrainer.simpo_loss``).

    ``l = -(1-eps) log sigma(beta (S_w/|y_w| - S_l/|y_l| - rho)) - eps log sigma(-...)``
    (``"sigmoid"``) or ``max(0, 1 - beta (...))`` (``"hinge"``); total
    ``mean_b l + sft_weight * NLL``. The paper's margin is ``gamma = beta * rho``.

    Parameters
    ----------
    policy_chosen_logps, policy_rejected_logps : torch.Tensor
        ``[B]`` summed policy log-probs (averaged here by the lengths).
    chosen_lengths, rejected_lengths : torch.Tensor
        ``[B]`` completion token counts (> 0; the reference code gives NaN on 0,
        prefkern raises ``ValueError``).
    beta : float, default 2.0
    gamma_beta_ratio : float, default 0.25
        ``rho = gamma / beta``.
    label_smoothing : float, default 0.0
        ``eps`` (sigmoid only).
    loss_type : {"sigmoid", "hinge"}, default "sigmoid"
    sft_weight : float, default 0.0
        Weight of the chosen token-mean NLL (needs ``chosen_nll`` when > 0).
    chosen_nll : torch.Tensor, optional
        0-d token-mean NLL of the chosen completions.

    Returns
    -------
    PreferenceLossOutput
        ``losses [B]`` = ``l + sft_weight * NLL``; rewards ``beta * S/|y|``; metrics
        ``rewards/*``, ``logps/*`` (averaged), ``sft_loss`` when used.
    """
    if loss_type not in ("sigmoid", "hinge"):
        raise ValueError(f"unknown SimPO loss_type {loss_type!r}; expected 'sigmoid' or 'hinge'")
    beta = check_number("beta", beta, low=0.0, low_open=True)
    ratio = check_number("gamma_beta_ratio", gamma_beta_ratio)
    eps = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    sft_weight = check_number("sft_weight", sft_weight)
    pc, pr = sequence_inputs([("policy_chosen_logps", policy_chosen_logps),
                              ("policy_rejected_logps", policy_rejected_logps)])
    lc = lengths_input("chosen_lengths", chosen_lengths, pc)
    lr = lengths_input("rejected_lengths", rejected_lengths, pc)
    check_positive_lengths("chosen_lengths", lc, "SimPO")
    check_positive_lengths("rejected_lengths", lr, "SimPO")
    avc, avr = pc / lc, pr / lr
    logits = avc - avr - ratio
    if loss_type == "sigmoid":
        losses = smoothed_sigmoid_loss(beta * logits, eps)
    else:
        losses = torch.relu(1.0 - beta * logits)
    chosen_rewards, rejected_rewards = beta * avc.detach(), beta * avr.detach()
    metrics = pair_metrics(chosen_rewards, rejected_rewards, avc, avr)
    if sft_weight != 0.0:
        if chosen_nll is None:
            raise ValueError("sft_weight != 0 needs chosen_nll (0-d token-mean NLL of the chosen completions)")
        nll = scalar_input("chosen_nll", chosen_nll, pc)
        losses = losses + sft_weight * nll
        metrics["sft_loss"] = nll.detach()
    return finish("simpo_loss", losses.mean(), losses, chosen_rewards, rejected_rewards, metrics)
