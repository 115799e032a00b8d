"""Preference-optimisation losses as exact, differentiable functions of log-probs (LOSSES.md).

Every loss takes per-sequence log-probs (``[B]`` sums, plus lengths / the
chosen NLL where needed) and returns a :class:`PreferenceLossOutput`. Helpers in
:mod:`.reductions` build those inputs from token log-probs ``[2B, T]`` + mask of a
``[chosen; rejected]`` batch (rows ``0..B-1`` chosen, ``B..2B-1`` rejected), so a
fused kernel that already produces per-sequence sums can call the losses directly.

Families: A -- :func:`dpo_loss` (every TRL ``DPOTrainer`` loss type, TRL <= 0.28
and >= 0.29 semantics via ``trl_version``); B -- :func:`simpo_loss`,
:func:`orpo_loss`, :func:`cpo_loss`, :func:`kto_loss`, :func:`ipo_loss`,
:func:`slic_hf_loss`; token-level / constrained -- :func:`salt_loss`,
:func:`c3po_loss`. :func:`preference_loss` dispatches by name.
"""
from .c3po import c3po_constraint, c3po_loss, distillation_kl
from .cpo import CPO_LOSS_TYPES, cpo_loss
from .dpo import DPO_LOSS_TYPES, F_DIVERGENCE_TYPES, BCORunningMean, dpo_loss, f_divergence_scores
from .ipo import ipo_loss, slic_hf_loss
from .kto import KTO_LOSS_TYPES, kto_loss, kto_mismatched_indices, kto_weights_in_range
from .orpo import orpo_log_odds, orpo_loss
from .outputs import PreferenceBatch, PreferenceLossOutput
from .reductions import (
    chosen_nll,
    concat_chosen_rejected,
    ld_sequence_logps,
    log1mexp,
    preference_batch,
    sequence_lengths,
    sequence_logps,
    split_chosen_rejected,
    wpo_sequence_weights,
)
from .registry import available_loss_types, preference_loss
from .salt import (
    SALT_CODE_EDITED_WEIGHTS,
    SALT_CODE_GENERATED_WEIGHTS,
    place_token_weights,
    salt_alignment,
    salt_loss,
    salt_token_weights,
)
from .simpo import simpo_loss

__all__ = [
    # entry point
    "preference_loss",
    "available_loss_types",
    # outputs
    "PreferenceLossOutput",
    "PreferenceBatch",
    # family A
    "dpo_loss",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "BCORunningMean",
    "f_divergence_scores",
    # family B
    "simpo_loss",
    "orpo_loss",
    "orpo_log_odds",
    "cpo_loss",
    "CPO_LOSS_TYPES",
    "kto_loss",
    "KTO_LOSS_TYPES",
    "kto_mismatched_indices",
    "kto_weights_in_range",
    "ipo_loss",
    "slic_hf_loss",
    # token-level and constrained
    "salt_loss",
    "salt_alignment",
    "salt_token_weights",
    "place_token_weights",
    "SALT_CODE_GENERATED_WEIGHTS",
    "SALT_CODE_EDITED_WEIGHTS",
    "c3po_loss",
    "c3po_constraint",
    "distillation_kl",
    # reductions
    "sequence_logps",
    "sequence_lengths",
    "split_chosen_rejected",
    "concat_chosen_rejected",
    "chosen_nll",
    "log1mexp",
    "ld_sequence_logps",
    "wpo_sequence_weights",
    "preference_batch",
]
