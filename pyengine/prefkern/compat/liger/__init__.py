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

Layout: one module per loss (``dpo``, ``orpo``, ``cpo``, ``simpo``, ``kto``), each a thin mapping of Liger's
signature onto a catalog objective and the engine; ``_base`` holds the shared constructor fields, input checks and
the aux outputs that need no logits.

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
* Cost: every class runs on the fused engine (:func:`prefkern.fused.fused_loss`), eager when a gradient is wanted: chunks of whole pairs
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

from .cpo import LigerFusedLinearCPOLoss
from .dpo import LigerFusedLinearDPOLoss
from .kto import LigerFusedLinearKTOLoss
from .orpo import LigerFusedLinearORPOLoss
from .simpo import LigerFusedLinearSimPOLoss
from .trl_patch import patch_trl, unpatch_trl  # noqa: F401  (TRL <= 1.13 route; not in __all__: no Liger class)

__all__ = [
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearSimPOLoss",
    "LigerFusedLinearKTOLoss",
]
