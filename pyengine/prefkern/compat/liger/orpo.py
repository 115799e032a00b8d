"""Liger's ``LigerFusedLinearORPOLoss`` on the fused engine (catalog :func:`prefkern.losses.orpo_loss`)."""

from __future__ import annotations

from typing import Optional

import torch

from ..._validation import check_lm_head, compute_dtype
from ...losses import chosen_nll
from ...ops.linear_logprobs import linear_logprobs
from ._base import LigerLoss, LigerOutput


class LigerFusedLinearORPOLoss(LigerLoss):
    """ORPO from hidden states and the lm-head; Liger 0.8.5 drop-in.

    ``loss = NLL - beta * mean_pairs log sigma(z)``, ``z = (a_w - a_l) - [log(1 - e^{a_w}) - log(1 - e^{a_l})]``
    with ``a`` the length-averaged sequence log-probs (:func:`prefkern.losses.orpo_loss`).

    Parameters
    ----------
    ignore_index : int, default -100
        Label of prompt and padding positions in ``target``.
    beta : float, default 0.1
        Weight of the odds-ratio term (ORPO's lambda).
    compute_nll_loss : bool, default True
        Add the chosen rows' token-mean NLL (weight 1, as in Liger) to the loss.
    compiled : bool, default True
        Liger: ``torch.compile`` the chunk step. Accepted and ignored.
    chunk_size : int, default 1
        Liger: pairs per chunk. Accepted (must be >= 1) and ignored.

    Raises
    ------
    ValueError, TypeError
        An argument out of range or of the wrong type.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        chunk_size: int = 1,
    ) -> None:
        super().__init__(ignore_index, beta, compiled, chunk_size, positive_beta=False,
                         compute_nll_loss=compute_nll_loss)

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        nll_target: Optional[torch.Tensor] = None,
    ) -> LigerOutput:
        """ORPO loss and Liger's aux outputs.

        Parameters
        ----------
        lin_weight : [V, H] lm-head weight.
        _input : [2B, T, H] last hidden states, chosen rows then rejected rows.
        target : [2B, T] token ids aligned with ``_input``, ``ignore_index`` off the completion.
        bias : [V] or None.
        nll_target : [2B, T] or None, labels of the NLL term (its chosen half is used, e.g. to include
            the prompt); default ``target``.

        Returns
        -------
        loss : 0-d fp32, differentiable.
        aux : tuple of detached fp32 tensors
            ``(chosen_logps [B], rejected_logps [B], chosen_logits_mean, rejected_logits_mean, nll_loss,
            chosen_rewards [B], rejected_rewards [B], log_odds_ratio, log_odds_chosen)``: logps are
            length-averaged, rewards ``beta * logps``, ``log_odds_ratio = mean log sigma(z)``,
            ``log_odds_chosen = mean z``.
        """
        hidden, weight, target, mask = self.paired_inputs(lin_weight, _input, target, bias)
        nll = None
        if not self.compute_nll_loss:
            nll = torch.zeros((), dtype=compute_dtype(hidden), device=hidden.device)
        elif nll_target is not None:
            nll = self._nll_over(hidden, weight, bias, nll_target, target)
        return self.paired_loss(hidden, weight, bias, target, mask, "orpo", {"beta": self.beta},
                                reported_average=True, empty_rows_why="this loss (length-averaged log-probs)",
                                chosen_nll=nll, add_nll=False, metrics=("log_odds_ratio", "log_odds_chosen"))

    def _nll_over(self, hidden, weight, bias, nll_target, target) -> torch.Tensor:
        """Chosen token-mean NLL over other labels (``nll_target``'s chosen half): a differentiable pass of its own,
        so the policy pass then streams."""
        if not isinstance(nll_target, torch.Tensor):
            raise TypeError(f"nll_target must be a torch.Tensor or None, got {type(nll_target).__name__}")
        if tuple(nll_target.shape) != tuple(target.shape):
            raise ValueError(f"nll_target must have target's shape {tuple(target.shape)} ([2B, T]; its chosen "
                             f"half is used), got {tuple(nll_target.shape)}")
        b = hidden.shape[0] // 2
        labels = nll_target[:b]
        check_lm_head(hidden[:b], weight, labels, bias, names=("_input", "lin_weight", "nll_target", "bias"))
        tok = linear_logprobs(hidden[:b], weight, labels, bias, ignore_index=self.ignore_index)
        return chosen_nll(tok, labels != self.ignore_index)


__all__ = ["LigerFusedLinearORPOLoss"]
