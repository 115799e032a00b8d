"""Drop-in replacements for Liger-Kernel 0.8.5's fused linear preference losses.

Switching is a one-line import change::

    # from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    from prefkern.compat.liger import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)
    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
           nll_loss, chosen_rewards, rejected_rewards) = loss_fn(
        lm_head.weight, hidden, labels, lm_head.bias, ref_input=ref_hidden, ref_weight=ref_head.weight)

Every class has Liger 0.8.5's constructor and ``forward`` signature (note that KTO takes
``(_input, lin_weight, ...)`` while the paired losses take ``(lin_weight, _input, ...)``, as in Liger)
and returns Liger's ``(loss, aux_outputs)`` pair. The token log-probs come from
:func:`prefkern.linear_logprobs` (the ``[tokens, V]`` logits never exist) and the objectives from the loss
catalog (:func:`~prefkern.losses.dpo_loss`, :func:`~prefkern.losses.orpo_loss`,
:func:`~prefkern.losses.cpo_loss`, :func:`~prefkern.losses.simpo_loss`); gradients reach ``_input``,
``lin_weight`` and ``bias`` through ordinary autograd.

Conventions shared with Liger
-----------------------------
* Paired inputs stack ``[chosen; rejected]`` on the batch dimension: ``_input [2B, T, H]``,
  ``target [2B, T]``; ``target`` is already aligned with ``_input`` (no shift) and ``ignore_index`` marks
  prompt and padding positions.
* Sequence log-probs are sums over the scored tokens, or means when ``average_log_prob`` is on (ORPO and
  SimPO always average, as in Liger).
* ``nll_loss`` is the chosen rows' token-mean NLL (over ``nll_target`` when ORPO is given one);
  it is added as ``alpha * nll_loss`` when ``compute_nll_loss`` is on and reported as 0 otherwise.
* ``chosen_logits_mean`` / ``rejected_logits_mean`` are the means of the logits over *all* ``B x T x V``
  entries of the chosen / rejected half (ignored positions included), as Liger defines them. They are
  computed without logits from ``sum_{b,t,v} z_btv = sum_{b,t} x_bt . sum_v W_v + B T sum_v b_v``
  (hidden rows summed in fp32, the dot product in fp64); KTO reports the same sums without dividing.
* Aux outputs are detached; the reference pass runs under ``torch.no_grad()``.

Where prefkern differs (on purpose)
-----------------------------------
* ``compiled`` and ``chunk_size`` only tune Liger's implementation (``torch.compile`` and pairs per
  chunk). They are validated and stored but have no effect: prefkern's kernels are compiled ahead of
  time (native C++ on CPU, Triton/CUDA on GPU) and chunk by a fixed logits-buffer budget.
* Inputs on which Liger silently returns NaN raise ``ValueError`` (a completion with no scored token
  under length averaging, an empty chosen half for the NLL, an ORPO mean log-prob of 0) or
  ``FloatingPointError`` (a non-finite loss), as everywhere in prefkern.
* ``ref_weight=None`` with a reference model uses the policy's head (``lin_weight`` and, when ``ref_bias``
  is None too, ``bias``), detached; Liger 0.8.5 fails there.
* KTO with a per-example ``kl`` of shape ``[B]`` pairs example ``i`` with ``kl[i]``. Liger 0.8.5 does that
  only when the whole batch is one chunk (``B // chunk_size <= 1``); with more chunks it broadcasts each
  chunk against all of ``kl``. A scalar ``kl`` gives the same result in both.
* ``beta`` must be > 0 for DPO, CPO and SimPO, and ``label_smoothing`` lie in [0, 1] for CPO and SimPO
  (checked at construction; Liger accepts any number).
* Cost: every class takes :mod:`prefkern.eager`'s path when a gradient is wanted: chunks of whole pairs
  (KTO: whole examples) through the lm-head once, the loss gradient taken per chunk and the dX / dW GEMMs
  inside forward (3 matmul units for a trained step, as Liger) holding one chunk of fp32 logits, sized by
  tokens rather than ``chunk_size``. DPO's ``bco_pair`` (a running mean across the batch), ORPO with an
  ``nll_target`` and float64 inputs stream through :func:`prefkern.linear_logprobs` (forward,
  recompute, dX, dW: 4 units, one chunk of logits at a time). The reference pass is 1 unit.
  ``backward`` of an eager loss runs once (its stored gradients are scaled in place).
* Liger 0.8.5 has no precomputed reference log-probs in these classes, so neither does this module
  (use :class:`prefkern.FusedLinearPreferenceLoss` with ``ref_logps=...`` for that).

Every Liger output is reproduced; none needs the logits.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import nn

from ..losses import chosen_nll, cpo_loss, dpo_loss, orpo_loss, sequence_lengths, sequence_logps, simpo_loss
from ..eager import eager_applies, eager_chunks, pair_fits, with_gradients
from ..ops.linear_logprobs import linear_logprobs

__all__ = [
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearSimPOLoss",
    "LigerFusedLinearKTOLoss",
]

LigerOutput = Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]

_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INDEX = (torch.int64, torch.int32)


# ---- argument checks ------------------------------------------------------------------------------------


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    return float(value)


def _ranged(name: str, value: object, low: float, high: float = float("inf"), *, low_open: bool = False) -> float:
    v = _number(name, value)
    if v < low or (low_open and v == low) or v > high:
        lo = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {lo}{low}, {high}], got {v}")
    return v


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _chunk_size(value: object) -> int:
    value = _integer("chunk_size", value)
    if value < 1:
        raise ValueError(f"chunk_size must be >= 1, got {value}")
    return value


def _check_inputs(
    _input: object, lin_weight: object, target: object, bias: object, *, paired: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes, dtypes and devices of ``(_input, lin_weight, target, bias)`` with Liger's argument names."""
    for name, t in (("_input", _input), ("lin_weight", lin_weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    layout = "[2B, T, H] ([chosen; rejected])" if paired else "[B, T, H]"
    if _input.dim() != 3:
        raise ValueError(f"_input must have shape {layout}, got {tuple(_input.shape)}")
    if _input.dtype not in _FLOAT:
        raise TypeError(f"_input must be a floating tensor, got {_input.dtype}")
    if lin_weight.dim() != 2 or lin_weight.shape[1] != _input.shape[2]:
        raise ValueError(f"lin_weight must have shape [V, H] with H = {_input.shape[2]} (_input's last dim), "
                         f"got {tuple(lin_weight.shape)}")
    if lin_weight.dtype != _input.dtype:
        raise TypeError(f"lin_weight must have the dtype of _input ({_input.dtype}), got {lin_weight.dtype}")
    if target.dtype not in _INDEX:
        raise TypeError(f"target must be an int64 or int32 tensor, got {target.dtype}")
    if tuple(target.shape) != tuple(_input.shape[:2]):
        raise ValueError(f"target must have shape {tuple(_input.shape[:2])} (_input's leading dims), "
                         f"got {tuple(target.shape)}")
    if _input.shape[0] == 0 or (paired and _input.shape[0] % 2 != 0):
        what = "a non-zero even first dim (chosen rows, then rejected rows)" if paired else "at least one row"
        raise ValueError(f"_input must have {what}, got shape {tuple(_input.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (lin_weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{lin_weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != _input.dtype:
            raise TypeError(f"bias must have the dtype of _input ({_input.dtype}), got {bias.dtype}")
    for name, t in (("lin_weight", lin_weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != _input.device:
            raise ValueError(f"{name} is on {t.device} but _input is on {_input.device}")
    return _input, lin_weight, target


# ---- shared pieces of the forward ---------------------------------------------------------------------------


def _check_scored(mask: torch.Tensor, why: str) -> None:
    """ValueError naming ``target`` when a row has no scored token and the loss divides by its length."""
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"target rows {empty} have no scored token (all ignore_index): {why} divides by the "
                         f"completion length (Liger gives 0/0 = NaN); drop empty completions first")


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: Optional[torch.Tensor],
                 ignore_index: int) -> torch.Tensor:
    """``[N, T]`` fp32 log-probs of ``target`` (0 at ignored positions), differentiable, no logits tensor."""
    return linear_logprobs(hidden, weight, target, bias, ignore_index=ignore_index)


def _reference_logps(
    ref_input: Optional[torch.Tensor],
    ref_weight: Optional[torch.Tensor],
    ref_bias: Optional[torch.Tensor],
    lin_weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    mask: torch.Tensor,
    ignore_index: int,
    average: bool,
) -> torch.Tensor:
    """``[N]`` reference sequence log-probs (sum or mean), computed without gradient."""
    if ref_input is None:
        raise ValueError("ref_input is required when use_ref_model=True (the reference model's hidden states, "
                         "shaped like _input); pass use_ref_model=False for a reference-free loss")
    if not isinstance(ref_input, torch.Tensor):
        raise TypeError(f"ref_input must be a torch.Tensor, got {type(ref_input).__name__}")
    if ref_input.dim() != 3 or tuple(ref_input.shape[:2]) != tuple(target.shape):
        raise ValueError(f"ref_input must have shape [N, T, H'] with [N, T] = {tuple(target.shape)} (target's "
                         f"shape), got {tuple(ref_input.shape)}")
    if ref_weight is None:
        ref_weight = lin_weight
        if ref_bias is None:
            ref_bias = bias
    elif not isinstance(ref_weight, torch.Tensor):
        raise TypeError(f"ref_weight must be a torch.Tensor or None, got {type(ref_weight).__name__}")
    if ref_bias is not None and not isinstance(ref_bias, torch.Tensor):
        raise TypeError(f"ref_bias must be a torch.Tensor or None, got {type(ref_bias).__name__}")
    with torch.no_grad():
        tok = linear_logprobs(ref_input.detach(), ref_weight.detach(), target,
                              None if ref_bias is None else ref_bias.detach(), ignore_index=ignore_index)
        return sequence_logps(tok, mask, average=average)


def _row_logit_sums(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``[N]`` fp64: ``sum_{t, v} (x_nt . W_v + b_v)`` for every row n, without the logits.

    ``sum_t x_nt`` is accumulated in fp32 (bf16/fp16 are upcast inside the reduction), the dot with
    ``sum_v W_v`` in fp64.
    """
    with torch.no_grad():
        rows = hidden.detach().sum(dim=1, dtype=torch.float32).to(torch.float64)
        cols = weight.detach().sum(dim=0, dtype=torch.float32).to(torch.float64)
        sums = rows @ cols
        if bias is not None:
            sums = sums + hidden.shape[1] * bias.detach().sum(dtype=torch.float32).to(torch.float64)
        return sums


def _logits_means(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Liger's ``chosen_logits_mean`` / ``rejected_logits_mean``: means over all ``B x T x V`` logits of each half."""
    sums = _row_logit_sums(hidden, weight, bias)
    denom = float(b * hidden.shape[1] * weight.shape[0])
    return (sums[:b].sum() / denom).to(torch.float32), (sums[b:].sum() / denom).to(torch.float32)


class _Pairs:
    """What the paired losses read from the token log-probs ``tok [2c, T]`` of pairs ``s..e-1`` of a batch of
    ``b`` pairs: the whole batch in stream mode, one chunk of it in eager mode (``check`` off)."""

    def __init__(self, tok: torch.Tensor, mask: torch.Tensor, s: int, e: int, b: int, chosen_tokens: torch.Tensor,
                 check: bool) -> None:
        self.tok, self.mask, self.s, self.e, self.b = tok, mask, s, e, b
        self.c = e - s
        self.chosen_tokens = chosen_tokens  # scored chosen tokens of the whole batch: the NLL's normaliser
        self.check = check

    def logps(self, average: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        if average and self.check:
            _check_scored(self.mask, "average_log_prob=True")
        seq = sequence_logps(self.tok, self.mask, average=average)
        return seq[: self.c], seq[self.c:]

    def sums_and_lengths(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.check:
            _check_scored(self.mask, "this loss (length-averaged log-probs)")
        seq = sequence_logps(self.tok, self.mask)
        lengths = sequence_lengths(self.mask)
        return seq[: self.c], seq[self.c:], lengths[: self.c], lengths[self.c:]

    def nll(self, compute: bool) -> torch.Tensor:
        """The batch's chosen token-mean NLL (a chunk: its part, times b / c, since the caller weighs the
        chunk's pair-mean loss by c / b)."""
        if not compute:
            return self.tok.new_zeros(())
        if self.check:
            return chosen_nll(self.tok[: self.c], self.mask[: self.c])
        return -(self.tok[: self.c] * self.mask[: self.c]).sum() / self.chosen_tokens * (self.b / self.c)

    def split(self, per_row: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """This slice's (chosen, rejected) entries of a ``[2B]`` per-sequence tensor of the whole batch."""
        return per_row[self.s: self.e], per_row[self.b + self.s: self.b + self.e]


# objective(pairs) -> (0-d loss, anything the caller reports); for eager mode the batch loss must be a mean
# over pairs of per-pair terms plus pairs.nll(...) terms
Objective = Callable[[_Pairs], Tuple[torch.Tensor, Any]]


class _PairedPass:
    """A ``[chosen; rejected]`` batch and the policy pass every paired loss makes over it."""

    def __init__(self, lin_weight: object, _input: object, target: object, bias: Optional[torch.Tensor],
                 ignore_index: int) -> None:
        self.hidden, self.weight, self.target = _check_inputs(_input, lin_weight, target, bias, paired=True)
        self.bias = bias
        self.ignore_index = ignore_index
        self.b = self.hidden.shape[0] // 2
        self.mask = self.target != ignore_index
        self.chosen_tokens = self.mask[: self.b].sum().clamp(min=1).to(torch.float32)

    def _whole(self, tok: torch.Tensor) -> _Pairs:
        return _Pairs(tok, self.mask, 0, self.b, self.b, self.chosen_tokens, check=True)

    def run(self, objective: Objective, eager: bool = True) -> Tuple[torch.Tensor, Any]:
        """``objective`` on the whole batch with gradients to ``_input``, ``lin_weight`` and ``bias``.

        Eager (3 matmul units: the gradients are taken chunk by chunk of pairs inside forward) when a
        gradient is wanted, the objective decomposes per pair (``eager``), the inputs are not float64 and a
        pair's fp32 logits fit a tenth of free memory; otherwise stream (:func:`prefkern.linear_logprobs`,
        4 units).
        """
        h, w, bias = self.hidden, self.weight, self.bias
        if not (eager and eager_applies(h, w, bias, "auto", "compat.liger")
                and pair_fits(h.shape[1], w.shape[0], None, h.device)):
            return objective(self._whole(_token_logps(h, w, self.target, bias, self.ignore_index)))
        with torch.no_grad():  # input errors before any GEMM: a dry run on placeholder log-probs (-1 per token)
            objective(self._whole(-self.mask.to(torch.float32)))

        def chunk_share(leaf: torch.Tensor, rows: torch.Tensor, s: int, e: int) -> torch.Tensor:
            pairs = _Pairs(leaf, self.mask[rows], s, e, self.b, self.chosen_tokens, check=False)
            return objective(pairs)[0] * ((e - s) / self.b)

        tok, grads = eager_chunks(h, w, bias, self.target, self.ignore_index, chunk_share, op="compat.liger")
        loss, extra = objective(self._whole(tok))
        return with_gradients(loss, h, w, bias, grads), extra

    def nll_over(self, nll_target: object) -> torch.Tensor:
        """Chosen token-mean NLL over other labels (ORPO's ``nll_target``; its chosen half): a pass of its own."""
        if not isinstance(nll_target, torch.Tensor):
            raise TypeError(f"nll_target must be a torch.Tensor or None, got {type(nll_target).__name__}")
        if tuple(nll_target.shape) != tuple(self.target.shape):
            raise ValueError(f"nll_target must have target's shape {tuple(self.target.shape)} ([2B, T]; its chosen "
                             f"half is used), got {tuple(nll_target.shape)}")
        labels = nll_target[: self.b]
        tok = _token_logps(self.hidden[: self.b], self.weight, labels, self.bias, self.ignore_index)
        return chosen_nll(tok, labels != self.ignore_index)

    def logits_means(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return _logits_means(self.hidden, self.weight, self.bias, self.b)


def _aux(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return tuple(t.detach() for t in tensors)


# ---- DPO ---------------------------------------------------------------------------------------------------------


class LigerFusedLinearDPOLoss(nn.Module):
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
        super().__init__()
        self.ignore_index = _integer("ignore_index", ignore_index)
        self.beta = _ranged("beta", beta, 0.0, low_open=True)
        self.alpha = _number("alpha", alpha)
        self.compute_nll_loss = _flag("compute_nll_loss", compute_nll_loss)
        self.compiled = _flag("compiled", compiled)
        self.use_ref_model = _flag("use_ref_model", use_ref_model)
        self.average_log_prob = _flag("average_log_prob", average_log_prob)
        self.chunk_size = _chunk_size(chunk_size)
        if not isinstance(loss_type, str):
            raise TypeError(f"loss_type must be a string, got {type(loss_type).__name__}")
        if loss_type not in self._SUPPORTED_LOSS_TYPES:
            raise ValueError(f"Unsupported loss_type: {loss_type}. Supported types are: "
                             f"{sorted(self._SUPPORTED_LOSS_TYPES)}")
        self.loss_type = loss_type
        self.label_smoothing = _number("label_smoothing", label_smoothing)
        self.discopop_tau = _ranged("discopop_tau", discopop_tau, 0.0, low_open=True)
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
        p = _PairedPass(lin_weight, _input, target, bias, self.ignore_index)
        ref = None
        if self.use_ref_model:
            ref = _reference_logps(ref_input, ref_weight, ref_bias, p.weight, bias, p.target, p.mask,
                                   self.ignore_index, self.average_log_prob)
        options = {}
        if self.loss_type in ("robust", "exo_pair"):
            options["label_smoothing"] = self.label_smoothing
        if self.loss_type == "discopop":
            options["discopop_tau"] = self.discopop_tau

        def objective(pairs: _Pairs):
            chosen, rejected = pairs.logps(self.average_log_prob)
            ref_chosen, ref_rejected = (torch.zeros_like(chosen), torch.zeros_like(rejected)) if ref is None \
                else pairs.split(ref)
            out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=self.loss_type, beta=self.beta,
                           **options)
            nll = pairs.nll(self.compute_nll_loss)
            loss = out.loss + self.alpha * nll if self.compute_nll_loss else out.loss
            return loss, (chosen, rejected, nll, out)

        # bco_pair keeps a running mean of the rewards across the batch: it does not split into pairs
        loss, (chosen, rejected, nll, out) = p.run(objective, eager=self.loss_type != "bco_pair")
        chosen_mean, rejected_mean = p.logits_means()
        return loss, _aux(chosen, rejected, chosen_mean, rejected_mean, nll, out.chosen_rewards, out.rejected_rewards)


# ---- ORPO --------------------------------------------------------------------------------------------------------


class LigerFusedLinearORPOLoss(nn.Module):
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
        super().__init__()
        self.ignore_index = _integer("ignore_index", ignore_index)
        self.beta = _number("beta", beta)
        self.compute_nll_loss = _flag("compute_nll_loss", compute_nll_loss)
        self.compiled = _flag("compiled", compiled)
        self.chunk_size = _chunk_size(chunk_size)

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
        p = _PairedPass(lin_weight, _input, target, bias, self.ignore_index)
        other_nll = None if nll_target is None or not self.compute_nll_loss else p.nll_over(nll_target)

        def objective(pairs: _Pairs):
            sum_c, sum_r, len_c, len_r = pairs.sums_and_lengths()
            nll = pairs.nll(self.compute_nll_loss) if other_nll is None else other_nll
            out = orpo_loss(sum_c, sum_r, len_c, len_r, nll, beta=self.beta)
            return out.loss, (nll, out, pairs.logps(average=True))

        # an NLL over other labels is a graph of its own: the policy pass then streams
        loss, (nll, out, (chosen, rejected)) = p.run(objective, eager=other_nll is None)
        chosen_mean, rejected_mean = p.logits_means()
        return loss, _aux(chosen, rejected, chosen_mean, rejected_mean, nll, out.chosen_rewards,
                          out.rejected_rewards, out.metrics["log_odds_ratio"], out.metrics["log_odds_chosen"])


# ---- CPO ---------------------------------------------------------------------------------------------------------


class LigerFusedLinearCPOLoss(nn.Module):
    """CPO from hidden states and the lm-head; Liger 0.8.5 drop-in.

    ``loss = mean_pairs [-(1-eps) log sigma(beta d) - eps log sigma(-beta d)] + alpha * NLL`` with
    ``d = log pi(y_w) - log pi(y_l)`` (sums, or means with ``average_log_prob``), reference-free
    (:func:`prefkern.losses.cpo_loss`).

    Parameters
    ----------
    ignore_index : int, default -100
        Label of prompt and padding positions in ``target``.
    beta : float, default 0.1
        Temperature of the preference term (> 0).
    alpha : float, default 1.0
        Weight of the chosen NLL (behaviour-cloning) term.
    label_smoothing : float, default 0.0
        epsilon of the smoothed sigmoid, in [0, 1].
    compute_nll_loss : bool, default True
        Add ``alpha`` x the chosen token-mean NLL.
    compiled : bool, default True
        Accepted and ignored.
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
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
    ) -> None:
        super().__init__()
        self.ignore_index = _integer("ignore_index", ignore_index)
        self.beta = _ranged("beta", beta, 0.0, low_open=True)
        self.alpha = _number("alpha", alpha)
        self.label_smoothing = _ranged("label_smoothing", label_smoothing, 0.0, 1.0)
        self.compute_nll_loss = _flag("compute_nll_loss", compute_nll_loss)
        self.compiled = _flag("compiled", compiled)
        self.average_log_prob = _flag("average_log_prob", average_log_prob)
        self.chunk_size = _chunk_size(chunk_size)

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
    ) -> LigerOutput:
        """CPO loss and Liger's aux outputs.

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
            chosen_rewards [B], rejected_rewards [B])``, rewards ``beta * logps``.
        """
        p = _PairedPass(lin_weight, _input, target, bias, self.ignore_index)

        def objective(pairs: _Pairs):
            chosen, rejected = pairs.logps(self.average_log_prob)
            out = cpo_loss(chosen, rejected, loss_type="sigmoid", beta=self.beta,
                           label_smoothing=self.label_smoothing, cpo_alpha=0.0)
            nll = pairs.nll(self.compute_nll_loss)
            loss = out.loss + self.alpha * nll if self.compute_nll_loss else out.loss
            return loss, (chosen, rejected, nll, out)

        loss, (chosen, rejected, nll, out) = p.run(objective)
        chosen_mean, rejected_mean = p.logits_means()
        return loss, _aux(chosen, rejected, chosen_mean, rejected_mean, nll, out.chosen_rewards, out.rejected_rewards)


# ---- SimPO -------------------------------------------------------------------------------------------------------


class LigerFusedLinearSimPOLoss(nn.Module):
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
        super().__init__()
        self.ignore_index = _integer("ignore_index", ignore_index)
        self.beta = _ranged("beta", beta, 0.0, low_open=True)
        self.alpha = _number("alpha", alpha)
        self.label_smoothing = _ranged("label_smoothing", label_smoothing, 0.0, 1.0)
        self.compute_nll_loss = _flag("compute_nll_loss", compute_nll_loss)
        self.compiled = _flag("compiled", compiled)
        self.gamma = _number("gamma", gamma)
        self.chunk_size = _chunk_size(chunk_size)

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
        p = _PairedPass(lin_weight, _input, target, bias, self.ignore_index)

        def objective(pairs: _Pairs):
            sum_c, sum_r, len_c, len_r = pairs.sums_and_lengths()
            out = simpo_loss(sum_c, sum_r, len_c, len_r, beta=self.beta, gamma_beta_ratio=self.gamma / self.beta,
                             label_smoothing=self.label_smoothing)
            nll = pairs.nll(self.compute_nll_loss)
            loss = out.loss + self.alpha * nll if self.compute_nll_loss else out.loss
            return loss, (nll, out, pairs.logps(average=True))

        loss, (nll, out, (chosen, rejected)) = p.run(objective)
        chosen_mean, rejected_mean = p.logits_means()
        return loss, _aux(chosen, rejected, chosen_mean, rejected_mean, nll, out.chosen_rewards, out.rejected_rewards)


# ---- KTO ---------------------------------------------------------------------------------------------------------


def _preference_labels(preference_labels: object, n: int, device: torch.device) -> torch.Tensor:
    if preference_labels is None:
        raise ValueError("preference_labels must be provided for the KTO loss ([B] bool, True = desirable)")
    if not isinstance(preference_labels, torch.Tensor):
        raise TypeError(f"preference_labels must be a torch.Tensor, got {type(preference_labels).__name__}")
    if tuple(preference_labels.shape) != (n,):
        raise ValueError(f"preference_labels must have shape [B] = [{n}] (one per row of _input), "
                         f"got {tuple(preference_labels.shape)}")
    if preference_labels.device != device:
        raise ValueError(f"preference_labels is on {preference_labels.device} but _input is on {device}")
    if preference_labels.dtype == torch.bool:
        return preference_labels
    if preference_labels.is_floating_point() or preference_labels.is_complex():
        raise TypeError(f"preference_labels must be bool (or 0/1 integers), got {preference_labels.dtype}")
    if not bool(((preference_labels == 0) | (preference_labels == 1)).all()):
        raise ValueError("preference_labels must contain only 0 and 1 (or be bool)")
    return preference_labels != 0


def _kl_reference(kl: object, n: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    if kl is None:
        return None
    if isinstance(kl, (int, float)) and not isinstance(kl, bool):
        return torch.tensor(float(kl), dtype=like.dtype, device=like.device)
    if not isinstance(kl, torch.Tensor):
        raise TypeError(f"kl must be a float, a 0-d tensor or a [B] tensor, got {type(kl).__name__}")
    if not kl.is_floating_point():
        raise TypeError(f"kl must be a floating tensor, got {kl.dtype}")
    if kl.numel() != 1 and tuple(kl.shape) != (n,):
        raise ValueError(f"kl must be a scalar or have shape [B] = [{n}], got {tuple(kl.shape)}")
    if kl.device != like.device:
        raise ValueError(f"kl is on {kl.device} but _input is on {like.device}")
    kl = kl.detach().to(like.dtype)
    return kl.reshape(()) if kl.numel() == 1 else kl


class LigerFusedLinearKTOLoss(nn.Module):
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
        super().__init__()
        self.ignore_index = _integer("ignore_index", ignore_index)
        self.beta = _number("beta", beta)
        self.compiled = _flag("compiled", compiled)
        self.use_ref_model = _flag("use_ref_model", use_ref_model)
        self.average_log_prob = _flag("average_log_prob", average_log_prob)
        self.chunk_size = _chunk_size(chunk_size)

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
        hidden, weight, target = _check_inputs(_input, lin_weight, target, bias, paired=False)
        n = hidden.shape[0]
        labels = _preference_labels(preference_labels, n, hidden.device)
        mask = target != self.ignore_index
        if self.average_log_prob:
            _check_scored(mask, "average_log_prob=True")
        ref = None
        if self.use_ref_model:
            ref = _reference_logps(ref_input, ref_weight, ref_bias, weight, bias, target, mask, self.ignore_index,
                                   self.average_log_prob)
        compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        z0 = _kl_reference(kl, n, hidden.new_empty((), dtype=compute))

        def examples(tok: torch.Tensor, rows) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(losses, logps, log-ratios) of the examples ``rows`` from their token log-probs ``tok``."""
            logps = sequence_logps(tok, mask[rows], average=self.average_log_prob)
            logratios = logps if ref is None else logps - ref[rows]
            margin = logratios if z0 is None else logratios - (z0 if z0.dim() == 0 else z0[rows])
            sign = torch.where(labels[rows], 1.0, -1.0).to(logps.dtype)
            return 1.0 - torch.sigmoid(self.beta * margin * sign), logps, logratios

        grads = None
        if eager_applies(hidden, weight, bias, "auto", "compat.liger") and \
                pair_fits(hidden.shape[1], weight.shape[0], None, hidden.device, rows=1):
            # the loss is a sum over examples / n: chunks of whole examples take their gradient in forward
            tok, grads = eager_chunks(hidden, weight, bias, target, self.ignore_index,
                                      lambda leaf, rows, s, e: examples(leaf, rows)[0].sum() / n, paired=False,
                                      op="compat.liger")
        else:
            tok = _token_logps(hidden, weight, target, bias, self.ignore_index)
        losses, logps, logratios = examples(tok, slice(None))
        loss = losses.sum() / n
        if grads is not None:
            loss = with_gradients(loss, hidden, weight, bias, grads)
        rewards = self.beta * logratios.detach()
        zero = logps.new_zeros(())
        logit_sums = _row_logit_sums(hidden, weight, bias)
        chosen_logits = logit_sums[labels].sum().to(torch.float32)
        rejected_logits = logit_sums[~labels].sum().to(torch.float32)
        return loss, _aux(
            torch.where(labels, logps, zero).sum(), torch.where(labels, zero, logps).sum(),
            chosen_logits, rejected_logits,
            torch.where(labels, rewards, zero).sum(), torch.where(labels, zero, rewards).sum(),
        )
