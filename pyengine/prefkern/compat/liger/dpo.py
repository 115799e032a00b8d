"""Liger's ``LigerFusedLinearDPOLoss`` on the fused engine (catalog :func:`prefkern.losses.dpo_loss`)."""

from __future__ import annotations

from typing import Optional

import torch

from ..._validation import check_flag, check_number, compute_dtype
from ._base import LigerLoss, LigerOutput, split_pairs


class LigerFusedLinearDPOLoss(LigerLoss):
    """DPO (and Liger's DPO variants) from hidden states and the lm-head; Liger 0.8.5 drop-in.

    With ``a = log pi(y_w) - log pi_ref(y_w)``, ``b = log pi(y_l) - log pi_ref(y_l)`` (sums, or means with
    ``average_log_prob``; the reference terms are 0 when ``use_ref_model=False``) the batch loss is
    ``mean_pairs l(a, b) + alpha * NLL`` with ``l`` the chosen ``loss_type`` of
    :func:`prefkern.losses.dpo_loss` (``"sigmoid"``: ``-log sigma(beta (a - b))``).

    Parameters
    ----------
    ignore_index : int, default -100
        Label of prompt and padding positions in ``target``.
    beta : float, default 0.1
        Temperature of the implicit reward (must be > 0).
    alpha : float, default 1.0
        Weight of the chosen NLL term (used when ``compute_nll_loss``).
    compute_nll_loss : bool, default False
        Add ``alpha`` x the chosen rows' token-mean NLL to the loss.
    compiled : bool, default True
        Liger: ``torch.compile`` the chunk step. Accepted and ignored (prefkern's kernels are compiled
        ahead of time).
    use_ref_model : bool, default True
        Score ``ref_input`` with the reference head and use it in the log-ratios.
    average_log_prob : bool, default False
        Average the sequence log-probs over the scored tokens instead of summing them.
    chunk_size : int, default 1
        Liger: pairs per chunk. Accepted (must be >= 1) and ignored (prefkern chunks by a logits-buffer
        budget).
    loss_type : str, default "sigmoid"
        One of ``"sigmoid"``, ``"hinge"``, ``"exo_pair"``, ``"nca_pair"``, ``"robust"``, ``"bco_pair"``,
        ``"sppo_hard"``, ``"apo_zero"``, ``"apo_down"``, ``"discopop"`` (Liger's set; ``"ipo"`` is refused
        as in Liger).
    label_smoothing : float, default 0.0
        epsilon of ``"robust"`` (in [0, 0.5)) and ``"exo_pair"`` (> 0); ignored by the other types.
    discopop_tau : float, default 0.05
        Temperature of ``"discopop"`` (> 0).

    Raises
    ------
    ValueError
        Unknown ``loss_type``; ``label_smoothing`` out of range for ``"robust"``/``"exo_pair"``; ``chunk_size < 1``.
    TypeError
        An argument of the wrong type.
    """

    _SUPPORTED_LOSS_TYPES = frozenset({
        "sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
        "discopop",
    })

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
    ) -> None:
        super().__init__(ignore_index, beta, compiled, chunk_size, positive_beta=True, alpha=alpha,
                         compute_nll_loss=compute_nll_loss)
        self.use_ref_model = check_flag("use_ref_model", use_ref_model)
        self.average_log_prob = check_flag("average_log_prob", average_log_prob)
        if not isinstance(loss_type, str):
            raise TypeError(f"loss_type must be a string, got {type(loss_type).__name__}")
        if loss_type not in self._SUPPORTED_LOSS_TYPES:
            raise ValueError(f"Unsupported loss_type: {loss_type}. Supported types are: "
                             f"{sorted(self._SUPPORTED_LOSS_TYPES)}")
        self.loss_type = loss_type
        self.label_smoothing = check_number("label_smoothing", label_smoothing)
        self.discopop_tau = check_number("discopop_tau", discopop_tau, low=0.0, low_open=True)
        if loss_type == "exo_pair" and self.label_smoothing <= 0.0:
            raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair'. The EXO paper recommends 1e-3.")
        if loss_type == "robust" and not (0.0 <= self.label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust'. "
                             f"Got {self.label_smoothing}.")

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        ref_input: Optional[torch.Tensor] = None,
        ref_weight: Optional[torch.Tensor] = None,
        ref_bias: Optional[torch.Tensor] = None,
    ) -> LigerOutput:
        """DPO loss and Liger's aux outputs.

        Parameters
        ----------
        lin_weight : [V, H] lm-head weight (same dtype as ``_input``).
        _input : [2B, T, H] last hidden states, chosen rows then rejected rows.
        target : [2B, T] int64/int32 token ids aligned with ``_input``, ``ignore_index`` off the completion.
        bias : [V] or None, lm-head bias.
        ref_input : [2B, T, H'] reference hidden states (required when ``use_ref_model``).
        ref_weight : [V, H'] reference head (None: the policy's head, detached).
        ref_bias : [V] or None, reference head bias.

        Returns
        -------
        loss : 0-d fp32, differentiable w.r.t. ``_input``, ``lin_weight`` and ``bias``.
        aux : tuple of detached fp32 tensors
            ``(chosen_logps [B], rejected_logps [B], chosen_logits_mean 0-d, rejected_logits_mean 0-d,
            nll_loss 0-d, chosen_rewards [B], rejected_rewards [B])`` with rewards ``beta * (logps - ref_logps)``.
        """
        hidden, weight, target, mask = self.paired_inputs(lin_weight, _input, target, bias)
        if self.use_ref_model:
            ref_seq = split_pairs(self.reference_logps(ref_input, ref_weight, ref_bias, weight, bias, target, mask))
        else:
            zeros = torch.zeros(hidden.shape[0] // 2, dtype=compute_dtype(hidden), device=hidden.device)
            ref_seq = (zeros, zeros)
        options = {"beta": self.beta}
        if self.loss_type in ("robust", "exo_pair"):
            options["label_smoothing"] = self.label_smoothing
        if self.loss_type == "discopop":
            options["discopop_tau"] = self.discopop_tau
        return self.paired_loss(hidden, weight, bias, target, mask, self.loss_type, options, ref_seq=ref_seq,
                                average_log_prob=self.average_log_prob,
                                empty_rows_why="average_log_prob=True" if self.average_log_prob else None)


__all__ = ["LigerFusedLinearDPOLoss"]
