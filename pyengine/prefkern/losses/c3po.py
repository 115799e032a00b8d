"""C3PO (LOSSES.md D): DPO on in-scope pairs + SFT/KD constraints on near- and out-of-scope prompts."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import finish
from .._validation import check_finite, check_number, check_floating, compute_dtype, scalar_input
from .dpo import dpo_loss
from .outputs import PreferenceLossOutput
from .reductions import _check_token_inputs

__all__ = ["c3po_loss", "c3po_constraint", "distillation_kl"]


def distillation_kl(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    average: bool = False,
) -> torch.Tensor:
    """Token KL ``KL(pi_0^(T) || pi_theta^(T))`` of temperature-``T`` softmaxes, for C3PO's KD term.

    Parameters
    ----------
    teacher_logits : torch.Tensor
        ``[B, T, V]`` reference-model logits (detached here).
    student_logits : torch.Tensor
        ``[B, T, V]`` policy logits.
    mask : torch.Tensor
        ``[B, T]`` response-token mask.
    temperature : float, default 1.0
    average : bool, default False
        Average over response tokens per sequence (``use_avg_kl``) instead of summing.

    Returns
    -------
    torch.Tensor
        0-d mean over the batch of the per-sequence KL (float32, or float64).
    """
    t = check_number("temperature", temperature, low=0.0, low_open=True)
    teacher_logits = check_floating("teacher_logits", teacher_logits)
    student_logits = check_floating("student_logits", student_logits)
    if teacher_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits and student_logits must both be [B, T, V]; got "
                         f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}")
    _, m = _check_token_inputs(torch.zeros(teacher_logits.shape[:2], device=teacher_logits.device), mask, "logits")
    dt = compute_dtype(teacher_logits, student_logits)
    lt = F.log_softmax(teacher_logits.detach().to(dt) / t, dim=-1)
    ls = F.log_softmax(student_logits.to(dt) / t, dim=-1)
    check_finite("teacher_logits", lt, where=m)
    check_finite("student_logits", ls, where=m)
    kl_tok = (lt.exp() * (lt - ls)).sum(-1)
    kl_seq = torch.where(m, kl_tok, torch.zeros((), dtype=dt, device=kl_tok.device)).sum(1)
    if average:
        n = m.sum(1)
        if bool((n == 0).any()):
            raise ValueError("distillation_kl(average=True): a row has no response token")
        kl_seq = kl_seq / n.to(dt)
    return kl_seq.mean()


def c3po_constraint(nll: torch.Tensor, kl: Optional[torch.Tensor] = None, *, kd_lambda: float = 0.0,
                    temperature: float = 1.0) -> torch.Tensor:
    """One constraint term ``(1 - kappa) NLL + kappa T^2 KL`` (pure SFT at ``kappa = 0``).

    Parameters
    ----------
    nll : torch.Tensor
        0-d token-mean NLL of the baseline responses (:func:`chosen_nll`).
    kl : torch.Tensor, optional
        0-d distillation KL (:func:`distillation_kl`); required when ``kd_lambda > 0``.
    kd_lambda : float, default 0.0
        ``kappa`` in ``[0, 1]`` (``lcdpo_lambda``; shipped config 0).
    temperature : float, default 1.0
        ``T`` (``lcdpo_temp``).

    Returns
    -------
    torch.Tensor
        0-d constraint loss.
    """
    k = check_number("kd_lambda", kd_lambda, low=0.0, high=1.0)
    t = check_number("temperature", temperature, low=0.0, low_open=True)
    nll = check_floating("nll", nll)
    ref = nll.to(compute_dtype(nll))
    nll = scalar_input("nll", nll, ref)
    if k == 0.0:
        return nll
    if kl is None:
        raise ValueError("kd_lambda > 0 needs kl (0-d distillation KL, see distillation_kl)")
    kl = scalar_input("kl", kl, ref)
    return (1.0 - k) * nll + k * t * t * kl


def c3po_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    out_of_scope_nll: torch.Tensor,
    near_scope_nll: torch.Tensor,
    beta: float = 0.1,
    out_of_scope_weight: float = 0.2,
    near_scope_weight: float = 0.1,
    kd_lambda: float = 0.0,
    temperature: float = 1.0,
    out_of_scope_kl: Optional[torch.Tensor] = None,
    near_scope_kl: Optional[torch.Tensor] = None,
    use_l2: bool = False,
) -> PreferenceLossOutput:
    """C3PO: ``L = L_DPO(D_in) + lambda1 L_c(D_out) + lambda2 L_c(D_near)`` (RLVF paper Eq. 5).

    ``L_DPO`` is the TRL sigmoid loss with the baseline model ``pi_0`` as reference;
    each constraint ``L_c`` is :func:`c3po_constraint` (pure SFT on the baseline
    responses at ``kd_lambda = 0``, the paper's choice). ``use_l2`` replaces
    ``lambda L_c`` by ``lambda * L_c^2 / 2`` (code option).

    Parameters
    ----------
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps : torch.Tensor
        ``[B]`` summed log-probs of the in-scope pairs ``(y+, y-)``; reference = ``pi_0``.
    out_of_scope_nll, near_scope_nll : torch.Tensor
        0-d token-mean NLL of the policy on the out-of-scope / near-scope baseline responses.
    beta : float, default 0.1
    out_of_scope_weight : float, default 0.2
        ``lambda1`` (``lcdpo_sigma_soft``), >= 0.
    near_scope_weight : float, default 0.1
        ``lambda2`` (``lcdpo_sigma_hard``), >= 0.
    kd_lambda, temperature : float
        ``kappa`` (default 0) and ``T`` (default 1) of the KD mix.
    out_of_scope_kl, near_scope_kl : torch.Tensor, optional
        0-d distillation KLs, required when ``kd_lambda > 0``.
    use_l2 : bool, default False

    Returns
    -------
    PreferenceLossOutput
        ``losses [B]`` = per-pair DPO loss + the constraint terms (their mean is the
        loss); DPO rewards and metrics plus ``loss/dpo``, ``loss/out_of_scope``,
        ``loss/near_scope``.
    """
    l1 = check_number("out_of_scope_weight", out_of_scope_weight, low=0.0)
    l2 = check_number("near_scope_weight", near_scope_weight, low=0.0)
    dpo = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   loss_type="sigmoid", beta=beta)
    c_out = c3po_constraint(out_of_scope_nll, out_of_scope_kl, kd_lambda=kd_lambda, temperature=temperature)
    c_near = c3po_constraint(near_scope_nll, near_scope_kl, kd_lambda=kd_lambda, temperature=temperature)
    dt = dpo.loss.dtype
    for n, c in (("out_of_scope_nll", c_out), ("near_scope_nll", c_near)):
        if c.device != dpo.loss.device:
            raise ValueError(f"{n} is on {c.device} but the in-scope log-probs are on {dpo.loss.device}")
    c_out, c_near = c_out.to(dt), c_near.to(dt)
    if use_l2:
        extra = l1 * 0.5 * c_out ** 2 + l2 * 0.5 * c_near ** 2
    else:
        extra = l1 * c_out + l2 * c_near
    metrics = dict(dpo.metrics)
    metrics["loss/dpo"] = dpo.loss.detach()
    metrics["loss/out_of_scope"] = c_out.detach()
    metrics["loss/near_scope"] = c_near.detach()
    return finish("c3po_loss", dpo.loss + extra, dpo.losses + extra, dpo.chosen_rewards, dpo.rejected_rewards,
                  metrics)
