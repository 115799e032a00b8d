"""IPO in the paper's form and the SLiC-HF hinge (LOSSES.md B.5, B.6)."""
from __future__ import annotations

from typing import Optional

import torch

from ._common import finish, pair_metrics
from .._validation import check_number, sequence_inputs
from .outputs import PreferenceLossOutput

__all__ = ["ipo_loss", "slic_hf_loss"]


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    tau: float = 0.1,
) -> PreferenceLossOutput:
    """IPO as written in the paper (Azar et al.), on **summed** log-ratios.

    ``l = (Delta - 1/(2 tau))^2`` with ``Delta = a - b``. TRL's length-averaged
    variant is ``dpo_loss(loss_type="ipo")``; the reference-free one is
    ``cpo_loss(loss_type="ipo")``.

    Parameters
    ----------
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps : torch.Tensor
        ``[B]`` summed log-probs (reference detached).
    tau : float, default 0.1
        The paper's regulariser (> 0).

    Returns
    -------
    PreferenceLossOutput
        ``losses [B]``; rewards ``tau * a``, ``tau * b``; metrics ``rewards/*``, ``logps/*``.
    """
    tau = check_number("tau", tau, low=0.0, low_open=True)
    pc, pr, rc, rr = sequence_inputs([
        ("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)])
    if rc is None or rr is None:
        raise ValueError("ipo_loss needs ref_chosen_logps and ref_rejected_logps ([B] each)")
    a, b = pc - rc.detach(), pr - rr.detach()
    losses = (a - b - 1.0 / (2.0 * tau)) ** 2
    cr, rj = tau * a.detach(), tau * b.detach()
    return finish("ipo_loss", losses.mean(), losses, cr, rj, pair_metrics(cr, rj, pc, pr))


def slic_hf_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    delta: float = 1.0,
    reg_weight: float = 0.0,
    target_logps: Optional[torch.Tensor] = None,
) -> PreferenceLossOutput:
    """SLiC-HF: ``max(0, delta - S_theta(y_w) + S_theta(y_l)) - lambda * S_theta(y_ref)``.

    Parameters
    ----------
    policy_chosen_logps, policy_rejected_logps : torch.Tensor
        ``[B]`` summed policy log-probs.
    delta : float, default 1.0
        Calibration margin (> 0). The paper's own values were not verified
        (LOSSES.md H); RSO writes it as ``1/gamma``.
    reg_weight : float, default 0.0
        ``lambda``, weight of the regulariser on the SFT targets ``y_ref``.
    target_logps : torch.Tensor, optional
        ``[B]`` summed log-probs of ``y_ref``; defaults to the chosen completion.

    Returns
    -------
    PreferenceLossOutput
        ``losses [B]``; rewards ``S_theta(y_w)``, ``S_theta(y_l)`` (reference-free);
        metrics ``rewards/*``, ``logps/*``.
    """
    delta = check_number("delta", delta, low=0.0, low_open=True)
    lam = check_number("reg_weight", reg_weight)
    pc, pr, tgt = sequence_inputs([("policy_chosen_logps", policy_chosen_logps),
                                   ("policy_rejected_logps", policy_rejected_logps),
                                   ("target_logps", target_logps)])
    if tgt is None:
        tgt = pc
    losses = torch.relu(delta - pc + pr) - lam * tgt
    return finish("slic_hf_loss", losses.mean(), losses, pc.detach(), pr.detach(),
                  pair_metrics(pc.detach(), pr.detach(), pc, pr))
