"""Liger's ``LigerFusedLinearKTOLoss`` on the fused engine.

Liger's KTO uses its ``kl`` reference point as given (per row or a scalar, no clamp), unlike the catalog's
:func:`prefkern.losses.kto_loss` (TRL: clamped at 0), so its objective is written here on the engine's interface.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..._validation import (
    check_finite, check_flag, check_floating, check_number, check_same_device, compute_dtype,
)
from ...fused.objective import BatchObjective
from ...losses import PreferenceLossOutput, sequence_logps
from ._base import LigerLoss, LigerOutput, check_scored, detached, row_logit_sums


def _desirable(preference_labels: object, n: int, device: torch.device) -> torch.Tensor:
    if preference_labels is None:
        raise ValueError("preference_labels must be provided for the KTO loss ([B] bool, True = desirable)")
    if not isinstance(preference_labels, torch.Tensor):
        raise TypeError(f"preference_labels must be a torch.Tensor, got {type(preference_labels).__name__}")
    if tuple(preference_labels.shape) != (n,):
        raise ValueError(f"preference_labels must have shape [B] = [{n}] (one per row of _input), "
                         f"got {tuple(preference_labels.shape)}")
    check_same_device(_input=torch.empty(0, device=device), preference_labels=preference_labels)
    if preference_labels.dtype == torch.bool:
        return preference_labels
    if preference_labels.is_floating_point() or preference_labels.is_complex():
        raise TypeError(f"preference_labels must be bool (or 0/1 integers), got {preference_labels.dtype}")
    if not bool(((preference_labels == 0) | (preference_labels == 1)).all()):
        raise ValueError("preference_labels must contain only 0 and 1 (or be bool)")
    return preference_labels != 0


def _kl_point(kl: object, n: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """Liger's ``kl``: None, a finite float, a 0-d tensor or a [B] tensor (no gradient)."""
    if kl is None:
        return None
    if isinstance(kl, torch.Tensor):
        check_floating("kl", kl)
        if kl.numel() != 1 and tuple(kl.shape) != (n,):
            raise ValueError(f"kl must be a scalar or have shape [B] = [{n}], got {tuple(kl.shape)}")
        if kl.device != like.device:
            raise ValueError(f"kl is on {kl.device} but _input is on {like.device}")
        kl = kl.detach().to(like.dtype)
    else:
        kl = torch.tensor(check_number("kl", kl, finite=True), dtype=like.dtype, device=like.device)
    check_finite("kl", kl)
    return kl.reshape(()) if kl.numel() == 1 else kl


class LigerKTOObjective(BatchObjective):
    """``1 - sigma(beta (r - kl) s)`` per example (``s = +1`` desirable, ``-1`` undesirable), meaned over the
    batch; ``r`` the policy sequence log-prob minus the reference's (sum, or mean with ``average``)."""

    unpaired = True

    def __init__(self, beta: float, mask: torch.Tensor, desirable: torch.Tensor, ref: Optional[torch.Tensor],
                 kl: Optional[torch.Tensor], average: bool) -> None:
        self.beta, self.mask, self.desirable, self.ref, self.kl, self.average = beta, mask, desirable, ref, kl, average

    def examples(self, token_logps: torch.Tensor, rows) -> tuple:
        """(losses, logps, log-ratios) of the examples ``rows`` from their token log-probs."""
        logps = sequence_logps(token_logps, self.mask[rows], average=self.average)
        logratios = logps if self.ref is None else logps - self.ref[rows]
        margin = logratios if self.kl is None else logratios - (self.kl if self.kl.dim() == 0 else self.kl[rows])
        sign = torch.where(self.desirable[rows], 1.0, -1.0).to(logps.dtype)
        return 1.0 - torch.sigmoid(self.beta * margin * sign), logps, logratios

    def check(self) -> None:
        if self.average:
            check_scored(self.mask, "average_log_prob=True")

    def chunk_share(self, token_logps: torch.Tensor, rows: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return self.examples(token_logps, rows)[0].sum() / self.mask.shape[0]

    def evaluate(self, token_logps: torch.Tensor) -> PreferenceLossOutput:
        losses, _, logratios = self.examples(token_logps, slice(None))
        rewards = self.beta * logratios.detach()
        return PreferenceLossOutput(loss=losses.sum() / self.mask.shape[0], losses=losses,
                                    chosen_rewards=rewards[self.desirable], rejected_rewards=rewards[~self.desirable])


class LigerFusedLinearKTOLoss(LigerLoss):
    """KTO from hidden states and the lm-head on an unpaired batch; Liger 0.8.5 drop-in.

    With ``r = log pi(y) - log pi_ref(y)`` (sums, or means with ``average_log_prob``; ``r = log pi(y)`` when
    ``use_ref_model=False``) and ``s = +1`` for desirable, ``-1`` for undesirable rows, each row's loss is
    ``1 - sigma(beta (r - kl) s)`` (``1 - sigma(beta r s)`` without ``kl``) and the batch loss their mean.
    ``kl`` is used as given, per row or as a scalar (Liger 0.8.5 semantics; the catalog's
    :func:`prefkern.losses.kto_loss` follows TRL and clamps the reference point at 0, so the formula is
    written here directly on top of :func:`prefkern.linear_logprobs`).

    Parameters
    ----------
    ignore_index : int, default -100
        Label of prompt and padding positions in ``target``.
    beta : float, default 0.1
        Temperature of the KTO value function.
    compiled : bool, default True
        Accepted and ignored.
    use_ref_model : bool, default False
        Score ``ref_input`` with the reference head and use the log-ratio ``r``.
    average_log_prob : bool, default False
        Average the sequence log-probs instead of summing them.
    chunk_size : int, default 1
        Accepted (must be >= 1) and ignored.

    Raises
    ------
    ValueError, TypeError
        An argument out of range or of the wrong type.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compiled: bool = True,
        use_ref_model: bool = False,
        average_log_prob: bool = False,
        chunk_size: int = 1,
    ) -> None:
        super().__init__(ignore_index, beta, compiled, chunk_size, positive_beta=False)
        self.use_ref_model = check_flag("use_ref_model", use_ref_model)
        self.average_log_prob = check_flag("average_log_prob", average_log_prob)

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        target: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        preference_labels: Optional[torch.Tensor] = None,
        ref_input: Optional[torch.Tensor] = None,
        ref_weight: Optional[torch.Tensor] = None,
        ref_bias: Optional[torch.Tensor] = None,
        kl: Union[torch.Tensor, float, None] = None,
    ) -> LigerOutput:
        """KTO loss and Liger's aux outputs (note the argument order: ``_input`` first, as in Liger).

        Parameters
        ----------
        _input : [B, T, H] last hidden states of the completions.
        lin_weight : [V, H] lm-head weight.
        target : [B, T] token ids aligned with ``_input``, ``ignore_index`` off the completion.
        bias : [V] or None.
        preference_labels : [B] bool (or 0/1 integers), True = desirable. Required.
        ref_input : [B, T, H'] reference hidden states (required when ``use_ref_model``).
        ref_weight : [V, H'] reference head (None: the policy's head, detached).
        ref_bias : [V] or None.
        kl : float, 0-d tensor or [B] tensor, optional
            KL reference point ``z0`` (no gradient); None drops it.

        Returns
        -------
        loss : 0-d fp32, differentiable.
        aux : tuple of detached fp32 0-d tensors
            ``(chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
            chosen_rewards_sum, rejected_rewards_sum)``: sums over the desirable / undesirable rows of the
            sequence log-probs, of all their ``T x V`` logits, and of the rewards ``beta * r``.
        """
        hidden, weight, target = self.inputs(_input, lin_weight, target, bias, paired=False)
        n = hidden.shape[0]
        desirable = _desirable(preference_labels, n, hidden.device)
        mask = target != self.ignore_index
        if self.average_log_prob:
            check_scored(mask, "average_log_prob=True")
        ref = None
        if self.use_ref_model:
            ref = self.reference_logps(ref_input, ref_weight, ref_bias, weight, bias, target, mask)
            if self.average_log_prob:
                ref = ref / mask.sum(-1).clamp(min=1)
        z0 = _kl_point(kl, n, hidden.new_empty((), dtype=compute_dtype(hidden)))
        objective = LigerKTOObjective(self.beta, mask, desirable, ref, z0, self.average_log_prob)
        res = self.run(hidden, weight, bias, target, objective)
        _, logps, logratios = objective.examples(res.token_logps.detach(), slice(None))
        rewards = self.beta * logratios
        zero = logps.new_zeros(())
        logit_sums = row_logit_sums(hidden, weight, bias)
        return res.output.loss, detached(
            torch.where(desirable, logps, zero).sum(), torch.where(desirable, zero, logps).sum(),
            logit_sums[desirable].sum().to(torch.float32), logit_sums[~desirable].sum().to(torch.float32),
            torch.where(desirable, rewards, zero).sum(), torch.where(desirable, zero, rewards).sum(),
        )


__all__ = ["LigerFusedLinearKTOLoss", "LigerKTOObjective"]
