"""Liger's ``LigerFusedLinearSimPOLoss`` on the fused engine (catalog :func:`prefkern.losses.simpo_loss`)."""

from __future__ import annotations

from typing import Optional

import torch

from ..._validation import check_number
from ._base import LigerLoss, LigerOutput


class LigerFusedLinearSimPOLoss(LigerLoss):
    """SimPO from hidden states and the lm-head; Liger 0.8.5 drop-in.

    ``loss = mean_pairs [-(1-eps) log sigma(u) - eps log sigma(-u)] + alpha * NLL``,
    ``u = beta (a_w - a_l) - gamma`` with ``a`` the length-averaged sequence log-probs
    (:func:`prefkern.losses.simpo_loss` with ``gamma_beta_ratio = gamma / beta``).

    Parameters
    ----------
    ignore_index : int, default -100
        Label of prompt and padding positions in ``target``.
    beta : float, default 0.1
        Reward scale (> 0).
    alpha : float, default 1.0
        Weight of the chosen NLL term.
    label_smoothing : float, default 0.0
        epsilon of the smoothed sigmoid, in [0, 1].
    compute_nll_loss : bool, default True
        Add ``alpha`` x the chosen token-mean NLL.
    compiled : bool, default True
        Accepted and ignored.
    gamma : float, default 0.5
        Target reward margin.
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
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
    ) -> None:
        super().__init__(ignore_index, beta, compiled, chunk_size, positive_beta=True, alpha=alpha,
                         compute_nll_loss=compute_nll_loss)
        self.label_smoothing = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
        self.gamma = check_number("gamma", gamma)

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
    ) -> LigerOutput:
        """SimPO loss and Liger's aux outputs.

        Parameters
        ----------
        lin_weight : [V, H] lm-head weight.
        _input : [2B, T, H] last hidden states, chosen rows then rejected rows.
        target : [2B, T] token ids aligned with ``_input``, ``ignore_index`` off the completion.
        bias : [V] or None.

        Returns
        -------
        loss : 0-d fp32, differentiable.
        aux : tuple of detached fp32 tensors
            ``(chosen_logps [B], rejected_logps [B], chosen_logits_mean, rejected_logits_mean, nll_loss,
            chosen_rewards [B], rejected_rewards [B])``; logps length-averaged, rewards ``beta * logps``.
        """
        hidden, weight, target, mask = self.paired_inputs(lin_weight, _input, target, bias)
        options = {"beta": self.beta, "gamma_beta_ratio": self.gamma / self.beta, "label_smoothing": self.label_smoothing}
        return self.paired_loss(hidden, weight, bias, target, mask, "simpo", options, reported_average=True,
                                empty_rows_why="this loss (length-averaged log-probs)")


__all__ = ["LigerFusedLinearSimPOLoss"]
