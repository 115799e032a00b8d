"""Small helpers shared by the loss modules (not public)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._validation import values_readable
from .outputs import PreferenceLossOutput


def logsig(z: torch.Tensor) -> torch.Tensor:
    return F.logsigmoid(z)


def smoothed_sigmoid_loss(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1-eps) log sigma(z) - eps log sigma(-z)`` (cDPO form); exact ``-log sigma(z)`` at eps=0."""
    if eps == 0.0:
        return -logsig(z)
    return -(1.0 - eps) * logsig(z) - eps * logsig(-z)


def parse_trl_version(trl_version: str) -> bool:
    """Return True for the current (>= 0.29) semantics, False for legacy (<= 0.28)."""
    if not isinstance(trl_version, str):
        raise TypeError(f"trl_version must be a string such as '0.29' or '0.28', got {type(trl_version).__name__}")
    parts = trl_version.strip().lstrip("v").split(".")
    try:
        major, minor = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ValueError(f"trl_version must look like '0.29' or '0.28', got {trl_version!r}") from None
    return (major, minor) >= (0, 29)


def pair_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: Optional[torch.Tensor] = None,
    rejected_logps: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    m = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (cr - rr).mean(),
        "rewards/accuracies": (cr > rr).to(cr.dtype).mean(),
    }
    if chosen_logps is not None:
        m["logps/chosen"] = chosen_logps.detach().mean()
    if rejected_logps is not None:
        m["logps/rejected"] = rejected_logps.detach().mean()
    return m


def finish(
    name: str,
    loss: torch.Tensor,
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    metrics: Dict[str, torch.Tensor],
) -> PreferenceLossOutput:
    """Build the output; refuse to return a non-finite loss (never a silent NaN)."""
    if values_readable(loss) and not bool(torch.isfinite(loss.detach())):
        raise FloatingPointError(
            f"{name}: the loss is not finite ({loss.item()}); the inputs are outside the range where the "
            f"formula is representable in {loss.dtype} (e.g. exp overflow in an f-divergence or a "
            f"log-prob of 0 in ORPO)"
        )
    return PreferenceLossOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        metrics=metrics,
    )


def normalize_loss_types(loss_type: object, allowed: Sequence[str], aliases: Dict[str, str], what: str) -> Tuple[str, ...]:
    if isinstance(loss_type, str):
        types = [loss_type]
    elif isinstance(loss_type, (list, tuple)):
        types = list(loss_type)
    else:
        raise TypeError(f"loss_type must be a string or a list of strings, got {type(loss_type).__name__}")
    if not types:
        raise ValueError("loss_type must not be empty")
    out = []
    for t in types:
        if not isinstance(t, str):
            raise TypeError(f"loss_type entries must be strings, got {type(t).__name__}")
        t = aliases.get(t, t)
        if t not in allowed:
            raise ValueError(f"unknown {what} loss_type {t!r}; expected one of {sorted(allowed)}")
        out.append(t)
    return tuple(out)
