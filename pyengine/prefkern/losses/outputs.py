"""Result types returned by every loss in :mod:`prefkern.losses`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch


@dataclass
class PreferenceLossOutput:
    """What every loss function returns.

    Attributes
    ----------
    loss : torch.Tensor
        0-d batch loss (differentiable), in the compute dtype (float32 for
        float32/bfloat16/float16 inputs, float64 for float64 inputs).
    losses : torch.Tensor
        Per-example losses ``[B]`` (per pair for paired losses, per example for
        KTO, per sequence for SALT). Their mean is ``loss`` unless the loss
        documents otherwise (``aot*`` give them in sorted-slot order; multi-loss
        and constrained losses document their own sum).
    chosen_rewards : torch.Tensor
        Detached implicit rewards of the chosen (desirable / edited) completions,
        ``[B]`` (for KTO ``[n_desirable]``).
    rejected_rewards : torch.Tensor
        Detached implicit rewards of the rejected (undesirable / generated)
        completions, ``[B]`` (for KTO ``[n_undesirable]``).
    metrics : dict[str, torch.Tensor]
        Detached 0-d tensors keyed like the reference trainer's logs
        (``"rewards/chosen"``, ``"rewards/margins"``, ``"rewards/accuracies"``,
        ``"logps/chosen"``, ``"nll_loss"``, ``"kl"``, ...).
    token_stats : prefkern.ops.linear_logprobs.TokenStats or None
        Per-token statistics of the policy's distribution (entropy, ``log sum p^2``, logit sum, top-1), each
        ``[R, T]`` fp32 without gradient, 0 off the completion; set by the fused modules built with
        ``return_stats=True`` (from the same pass over the logits as the loss), else None.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    token_stats: Optional[Any] = None


@dataclass
class PreferenceBatch:
    """Per-sequence inputs of a ``[chosen; rejected]`` batch, ready for any loss.

    Built by :func:`prefkern.losses.preference_batch` from token log-probs, or
    filled directly from per-sequence values (e.g. by a fused kernel).
    All tensors are ``[B]`` except ``chosen_nll`` (0-d).

    Attributes
    ----------
    policy_chosen_logps, policy_rejected_logps : torch.Tensor
        Summed policy log-probs ``S_theta(y_w)``, ``S_theta(y_l)``, ``[B]``.
    ref_chosen_logps, ref_rejected_logps : torch.Tensor or None
        Summed reference log-probs, ``[B]`` (``None`` when no reference pass).
    chosen_lengths, rejected_lengths : torch.Tensor or None
        Completion token counts ``|y|``, ``[B]``.
    chosen_nll : torch.Tensor or None
        Token-mean NLL over all chosen completion tokens of the batch, 0-d.
    kept : torch.Tensor or None
        ``[B_kept]`` int64 indices of the pairs kept by
        ``preference_batch(empty_completions="drop")`` (``None``: all kept).
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: Optional[torch.Tensor] = None
    ref_rejected_logps: Optional[torch.Tensor] = None
    chosen_lengths: Optional[torch.Tensor] = None
    rejected_lengths: Optional[torch.Tensor] = None
    chosen_nll: Optional[torch.Tensor] = None
    kept: Optional[torch.Tensor] = None
