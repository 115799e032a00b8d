"""KTO and unpaired APO-zero (LOSSES.md B.4), TRL ``KTOTrainer`` semantics."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ._common import finish
from .._validation import check_number, check_same_device, scalar_input, sequence_inputs, values_readable
from .outputs import PreferenceLossOutput

__all__ = ["KTO_LOSS_TYPES", "kto_loss", "kto_mismatched_indices", "kto_weights_in_range"]

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_mismatched_indices(batch_size: int, block_size: int) -> torch.Tensor:
    """Row permutation that builds KTO's mismatched completions ``y'``.

    Inside every block of ``block_size`` rows (TRL: ``per_device_train_batch_size``),
    row ``i`` takes the completion of row ``i - 1`` and the first row of the block
    takes the last one. A short last block is rotated the same way.

    Parameters
    ----------
    batch_size : int
        Number of rows (>= 1).
    block_size : int
        Rotation block (>= 2; TRL requires a per-device batch size > 1).

    Returns
    -------
    torch.Tensor
        ``[batch_size]`` int64 index: ``completions_for_kl = completions[idx]``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2 (KTO's KL term needs a batch > 1), got {block_size!r}")
    idx = torch.arange(batch_size)
    for start in range(0, batch_size, block_size):
        stop = min(start + block_size, batch_size)
        idx[start:stop] = torch.roll(torch.arange(start, stop), 1)
    return idx


def kto_weights_in_range(n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0,
                         undesirable_weight: float = 1.0) -> bool:
    """TRL's class-imbalance check (paper Eq. 8: ``lambda_D n_D / (lambda_U n_U) in [1, 4/3]``).

    Returns True when TRL would stay silent, i.e. ``lambda_D`` lies in
    ``[n_U lambda_U / n_D, 1.33 n_U lambda_U / n_D]`` or ``lambda_U`` lies in
    ``[n_D lambda_D / (1.33 n_U), n_D lambda_D / n_U]``.
    """
    if n_desirable <= 0 or n_undesirable <= 0:
        return True
    d_lo = n_undesirable * undesirable_weight / n_desirable
    u_hi = n_desirable * desirable_weight / n_undesirable
    return (d_lo <= desirable_weight <= 1.33 * d_lo) or (u_hi / 1.33 <= undesirable_weight <= u_hi)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: Optional[torch.Tensor] = None,
    *,
    kl_policy_logps: Optional[torch.Tensor] = None,
    kl_ref_logps: Optional[torch.Tensor] = None,
    kl: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    warn_imbalance: bool = False,
    labels: Optional[torch.Tensor] = None,
) -> PreferenceLossOutput:
    """KTO loss on an unpaired batch.

    With ``r = S_theta(y|x) - S_ref(y|x)`` and the detached reference point
    ``z0 = max(0, mean_i [S_theta(y'_i|x_i) - S_ref(y'_i|x_i)])`` over mismatched
    completions ``y'`` (:func:`kto_mismatched_indices`):
    desirable ``lambda_D (1 - sigma(beta (r - z0)))``, undesirable
    ``lambda_U (1 - sigma(beta (z0 - r)))``; the loss is the mean over all examples.
    ``loss_type="apo_zero_unpaired"``: desirable ``1 - sigma(beta r)``, undesirable
    ``sigma(beta r)`` (weighted the same way), no KL term.

    Parameters
    ----------
    policy_logps, ref_logps : torch.Tensor
        ``[N]`` summed completion log-probs (reference detached).
    desirable : torch.Tensor
        ``[N]`` bool (or 0/1 integer): True = desirable.
    kl_policy_logps, kl_ref_logps : torch.Tensor, optional
        ``[M]`` summed log-probs of the mismatched completions (``kto`` needs these
        or ``kl``); no gradient flows through them.
    kl : torch.Tensor or float, optional
        Precomputed ``mean(KL_policy - KL_ref)`` (e.g. already averaged across
        processes); clamped at 0 here. Overrides the two tensors above.
    beta : float, default 0.1
    desirable_weight, undesirable_weight : float, default 1.0
        ``lambda_D``, ``lambda_U``.
    loss_type : {"kto", "apo_zero_unpaired"}, default "kto"
    warn_imbalance : bool, default False
        Warn like TRL when the weights fall outside :func:`kto_weights_in_range`
        for this batch's counts.

    Returns
    -------
    PreferenceLossOutput
        ``losses [N]`` in input order (TRL concatenates desirable then undesirable;
        the mean is the same); ``chosen_rewards = beta r`` of the desirable
        examples ``[n_D]``, ``rejected_rewards`` of the undesirable ones ``[n_U]``;
        metrics ``kl`` (z0), ``rewards/chosen``, ``logps/chosen`` (if any
        desirable), ``rewards/rejected``, ``logps/rejected`` (if any undesirable),
        ``rewards/margins`` (if both).
    """
    if labels is not None:
        if desirable is not None:
            raise TypeError("pass desirable (labels is its deprecated name), not both")
        warnings.warn("kto_loss(labels=...) is deprecated: pass desirable=...", DeprecationWarning, stacklevel=2)
        desirable = labels
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; expected one of {KTO_LOSS_TYPES}")
    beta = check_number("beta", beta, low=0.0, low_open=True)
    wd = check_number("desirable_weight", desirable_weight, low=0.0)
    wu = check_number("undesirable_weight", undesirable_weight, low=0.0)
    pol, ref = sequence_inputs([("policy_logps", policy_logps), ("ref_logps", ref_logps)])
    if not isinstance(desirable, torch.Tensor):
        raise TypeError(f"desirable must be a torch.Tensor of shape [N] (bool), got {type(desirable).__name__}")
    if desirable.shape != pol.shape:
        raise ValueError(f"desirable must have shape {tuple(pol.shape)} ([N]), got {tuple(desirable.shape)}")
    check_same_device(policy_logps=pol, desirable=desirable)
    if desirable.dtype != torch.bool:
        if desirable.is_floating_point() or desirable.is_complex():
            raise TypeError(f"desirable must be bool or an integer 0/1 tensor, got {desirable.dtype}")
        if values_readable(desirable) and not bool(((desirable == 0) | (desirable == 1)).all()):
            raise ValueError("desirable must contain only 0 and 1")
        desirable = desirable != 0
    ref = ref.detach()
    if loss_type == "kto":
        if kl is not None:
            z0 = scalar_input("kl", kl, pol).detach().clamp(min=0)
        else:
            if kl_policy_logps is None or kl_ref_logps is None:
                raise ValueError("loss_type='kto' needs kl_policy_logps and kl_ref_logps ([M] log-probs of the "
                                 "mismatched completions, see kto_mismatched_indices) or a precomputed kl")
            kp, kr = sequence_inputs([("kl_policy_logps", kl_policy_logps), ("kl_ref_logps", kl_ref_logps)],
                                     dtype=pol.dtype)
            check_same_device(policy_logps=pol, kl_policy_logps=kp)
            z0 = (kp - kr).detach().mean().clamp(min=0)
    else:
        z0 = pol.new_zeros(())
    r = pol - ref
    if loss_type == "kto":
        des = wd * (1.0 - torch.sigmoid(beta * (r - z0)))
        und = wu * (1.0 - torch.sigmoid(beta * (z0 - r)))
    else:
        des = wd * (1.0 - torch.sigmoid(beta * r))
        und = wu * torch.sigmoid(beta * r)
    losses = torch.where(desirable, des, und)
    n_d, n_u = int(desirable.sum()), int((~desirable).sum())
    if warn_imbalance and not kto_weights_in_range(n_d, n_u, wd, wu):
        warnings.warn(f"KTO weights desirable={wd}, undesirable={wu} are outside the range recommended for "
                      f"{n_d} desirable / {n_u} undesirable examples (paper Eq. 8)", stacklevel=2)
    rewards = beta * r.detach()
    chosen_rewards, rejected_rewards = rewards[desirable], rewards[~desirable]
    metrics = {"kl": z0.detach()}
    if n_d:
        metrics["rewards/chosen"] = chosen_rewards.mean()
        metrics["logps/chosen"] = pol.detach()[desirable].mean()
    if n_u:
        metrics["rewards/rejected"] = rejected_rewards.mean()
        metrics["logps/rejected"] = pol.detach()[~desirable].mean()
    if n_d and n_u:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return finish(f"kto_loss({loss_type})", losses.mean(), losses, chosen_rewards, rejected_rewards, metrics)
