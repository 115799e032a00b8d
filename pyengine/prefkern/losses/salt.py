"""SALT: sequence-alignment (un)likelihood training (LOSSES.md C).

Two pieces: an edit alignment of the model output ``S_G`` against its edited
version ``S_E`` that yields a signed weight per token (:func:`salt_token_weights`,
:func:`place_token_weights`), and the loss on token log-probs
(:func:`salt_loss`, paper form by default, released-code form as an option).
Positive weights mean likelihood ``-log p``, negative weights unlikelihood
``-log(1 - p)`` with magnitude ``|w|``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._common import finish
from .._validation import check_finite, check_floating, check_number, compute_dtype, values_readable
from .outputs import PreferenceLossOutput
from .reductions import log1mexp

__all__ = [
    "SALT_CODE_GENERATED_WEIGHTS", "SALT_CODE_EDITED_WEIGHTS",
    "salt_alignment", "salt_token_weights", "place_token_weights", "salt_loss",
]

#: Code defaults (``trainer.py`` ``ScriptArguments``) for tokens of the generated summary S_G.
SALT_CODE_GENERATED_WEIGHTS: Dict[str, float] = {"C": 1.0, "D": -0.1, "S": -0.1}
#: Code defaults for tokens of the edited summary S_E (``SALT_trainer.py`` uses I = S = 1.1).
SALT_CODE_EDITED_WEIGHTS: Dict[str, float] = {"C": 1.0, "I": 1.0, "S": 1.0}
_UNLIKELIHOOD_FLOOR = 1e-8


def salt_alignment(generated: Sequence, edited: Sequence, *, match: int = 1, mismatch: int = -1,
                   gap: int = -1) -> List[str]:
    """Needleman-Wunsch alignment of ``generated`` (S_G) vs ``edited`` (S_E), minineedle tie-breaking.

    A cell takes the diagonal when it is >= both 'up' and 'left'; if the diagonal
    is >= 'up' but < 'left' it takes 'left'; if the diagonal is < 'up' it takes
    'up' only when 'up' > 'left', else 'left'. Traceback from the bottom-right.

    Parameters
    ----------
    generated, edited : sequence of hashable
        Token ids (or words) of the model output and of its edited version.

    Returns
    -------
    list of str
        One op per aligned column: ``"C"`` same token, ``"I"`` inserted in S_E
        (gap in S_G), ``"D"`` deleted from S_G (gap in S_E), ``"S"`` substituted.
    """
    gen, edi = list(generated), list(edited)
    n1, n2 = len(gen), len(edi)
    score = [[0] * (n1 + 1) for _ in range(n2 + 1)]
    move: List[List[Optional[str]]] = [[None] * (n1 + 1) for _ in range(n2 + 1)]
    for j in range(1, n1 + 1):
        score[0][j], move[0][j] = score[0][j - 1] + gap, "left"
    for i in range(1, n2 + 1):
        score[i][0], move[i][0] = score[i - 1][0] + gap, "up"
    for i in range(n2):
        for j in range(n1):
            up = score[i][j + 1] + gap
            left = score[i + 1][j] + gap
            diag = score[i][j] + (match if gen[j] == edi[i] else mismatch)
            if diag >= up:
                m, s = ("diag", diag) if diag >= left else ("left", left)
            else:
                m, s = ("up", up) if up > left else ("left", left)
            move[i + 1][j + 1], score[i + 1][j + 1] = m, s
    ops: List[str] = []
    i, j = n2, n1
    while move[i][j] is not None:
        m = move[i][j]
        if m == "diag":
            ops.append("C" if gen[j - 1] == edi[i - 1] else "S")
            i, j = i - 1, j - 1
        elif m == "up":
            ops.append("I")
            i -= 1
        else:
            ops.append("D")
            j -= 1
    return ops[::-1]


def salt_token_weights(
    generated: Sequence,
    edited: Sequence,
    *,
    generated_weights: Optional[Dict[str, float]] = None,
    edited_weights: Optional[Dict[str, float]] = None,
    dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """Per-token SALT weights from the edit alignment of S_G vs S_E.

    Parameters
    ----------
    generated, edited : sequence of hashable
        Completion token ids of the model output S_G (the "rejected" sequence)
        and of the edited text S_E (the "chosen" sequence).
    generated_weights : dict, optional
        Weight per op for S_G tokens, keys ``C``, ``D``, ``S`` (default
        :data:`SALT_CODE_GENERATED_WEIGHTS`: C=+1, D=S=-0.1).
    edited_weights : dict, optional
        Weight per op for S_E tokens, keys ``C``, ``I``, ``S`` (default
        :data:`SALT_CODE_EDITED_WEIGHTS`: all +1; the run config uses I=S=1.1).
    dtype : torch.dtype, default float32

    Returns
    -------
    (torch.Tensor, torch.Tensor, str)
        ``[len(generated)]`` and ``[len(edited)]`` signed weights, and the op
        string (e.g. ``"CIISSCD"``).
    """
    wg = dict(SALT_CODE_GENERATED_WEIGHTS if generated_weights is None else generated_weights)
    we = dict(SALT_CODE_EDITED_WEIGHTS if edited_weights is None else edited_weights)
    for name, w, keys in (("generated_weights", wg, "CDS"), ("edited_weights", we, "CIS")):
        missing = [k for k in keys if k not in w]
        if missing:
            raise ValueError(f"{name} needs weights for ops {list(keys)}; missing {missing}")
    ops = salt_alignment(generated, edited)
    g = [wg[o] for o in ops if o != "I"]
    e = [we[o] for o in ops if o != "D"]
    return torch.tensor(g, dtype=dtype), torch.tensor(e, dtype=dtype), "".join(ops)


def place_token_weights(weights: Sequence, mask: torch.Tensor) -> torch.Tensor:
    """Scatter per-row completion weights into the ``[B, T]`` positions where ``mask`` is set.

    Parameters
    ----------
    weights : sequence of 1-D tensors / lists
        ``B`` rows; row ``b`` has exactly ``mask[b].sum()`` entries (in order).
    mask : torch.Tensor
        ``[B, T]`` completion mask.

    Returns
    -------
    torch.Tensor
        ``[B, T]`` float32 weights, 0 outside the mask.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError("mask must be a [B, T] tensor")
    if len(weights) != mask.shape[0]:
        raise ValueError(f"weights has {len(weights)} rows but mask has {mask.shape[0]}")
    m = mask != 0
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for b, w in enumerate(weights):
        w = torch.as_tensor(w, dtype=torch.float32, device=mask.device).flatten()
        n = int(m[b].sum())
        if w.numel() != n:
            raise ValueError(f"row {b}: {w.numel()} weights for {n} completion positions")
        out[b, m[b]] = w
    return out


def _log1m_p(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - p) from log p, with 1 - p floored at 1e-8 where p == 1 (as the SALT code)."""
    one = logp >= 0
    safe = torch.where(one, torch.full_like(logp, -1.0), logp)
    return torch.where(one, torch.full_like(logp, math.log(_UNLIKELIHOOD_FLOOR)), log1mexp(safe))


def _side(token_logps: object, weights: object, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    x = check_floating(f"{name}_token_logps", token_logps)
    w = check_floating(f"{name}_weights", weights)
    if x.dim() != 2:
        raise ValueError(f"{name}_token_logps must have shape [B, T], got {tuple(x.shape)}")
    if w.shape != x.shape:
        raise ValueError(f"{name}_weights must have the shape of {name}_token_logps {tuple(x.shape)}, got {tuple(w.shape)}")
    if w.device != x.device:
        raise ValueError(f"{name}_weights is on {w.device} but {name}_token_logps on {x.device}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}_token_logps is empty (B=0)")
    check_finite(f"{name}_weights", w)
    check_finite(f"{name}_token_logps", x, where=w != 0)
    if values_readable(x) and (x.detach()[w != 0] > 0).any():
        raise ValueError(f"{name}_token_logps must be <= 0 (log-probabilities)")
    return x, w


def salt_loss(
    edited_token_logps: torch.Tensor,
    edited_weights: torch.Tensor,
    generated_token_logps: torch.Tensor,
    generated_weights: torch.Tensor,
    *,
    omega1: float = 1.0,
    omega2: float = 1.0,
    form: str = "paper",
    vocab_size: Optional[int] = None,
) -> PreferenceLossOutput:
    """SALT loss on token log-probs of the edited (S_E) and generated (S_G) summaries.

    ``psi(w, l) = w * (-l)`` for ``w > 0`` (likelihood) and ``|w| * (-log(1 - e^l))``
    for ``w < 0`` (unlikelihood); ``w = 0`` marks prompt/padding.

    * ``form="paper"`` (default, Yao et al. 2023 section 4.1): per sequence
      ``omega1 * sum_t psi(w_E, l_E) + omega2 * sum_t psi(w_G, l_G)`` -- kept S_G
      tokens get likelihood, changed ones unlikelihood; batch loss = mean.
    * ``form="code"`` (released ``LearnFromHumanEdit`` code):
      ``L = -omega1 C - omega2 R`` with
      ``C = (1/B) sum_b sum_t w+ l / N+`` (``w+ = max(w_E, 0)``) and
      ``R = (1/B) sum_b sum_t u [log(1-p) - log(V-1)] / N-`` (``u = max(-w_G, 0)``),
      ``N+-`` the number of non-zero weights in the whole batch (a term is 0 if
      its count is 0). Kept S_G tokens get no likelihood term.

    ``1 - p`` is floored at 1e-8 where ``p == 1``.

    Parameters
    ----------
    edited_token_logps, edited_weights : torch.Tensor
        ``[B, T_E]`` token log-probs of S_E and their signed weights
        (:func:`salt_token_weights` + :func:`place_token_weights`).
    generated_token_logps, generated_weights : torch.Tensor
        ``[B, T_G]`` token log-probs of S_G and their signed weights.
    omega1, omega2 : float, default 1.0
        Weights of the S_E and S_G terms (code defaults; the run config uses omega2=0.1).
    form : {"paper", "code"}, default "paper"
    vocab_size : int, optional
        ``V``, required for ``form="code"`` (the ``-log(V-1)`` offset; no gradient effect).

    Returns
    -------
    PreferenceLossOutput
        ``losses [B]`` per-sequence contributions (mean = loss);
        ``chosen_rewards[b] = sum_t w+ l_E`` (weighted log-likelihood of S_E) and
        ``rejected_rewards[b] = sum_t u log(1 - p_G)``; metrics ``edited_term`` and
        ``generated_term`` (paper: the mean per-sequence loss sums L_SE, L_SG; code:
        C and R).
    """
    if form not in ("paper", "code"):
        raise ValueError(f"form must be 'paper' or 'code', got {form!r}")
    o1 = check_number("omega1", omega1)
    o2 = check_number("omega2", omega2)
    xe, we = _side(edited_token_logps, edited_weights, "edited")
    xg, wg = _side(generated_token_logps, generated_weights, "generated")
    if xe.shape[0] != xg.shape[0]:
        raise ValueError(f"edited batch B={xe.shape[0]} differs from generated batch B={xg.shape[0]}")
    if xe.device != xg.device:
        raise ValueError(f"edited_token_logps on {xe.device} but generated_token_logps on {xg.device}")
    dt = compute_dtype(xe, xg, we, wg)
    xe, we, xg, wg = xe.to(dt), we.to(dt).detach(), xg.to(dt), wg.to(dt).detach()
    zero = torch.zeros((), dtype=dt, device=xe.device)
    xe = torch.where(we != 0, xe, zero)
    xg = torch.where(wg != 0, xg, zero)
    wpos, upos = we.clamp(min=0), (-wg).clamp(min=0)
    chosen_rewards = (wpos * xe).sum(1)
    rejected_rewards = (upos * _log1m_p(xg)).sum(1)
    B = xe.shape[0]
    if form == "paper":

        def psi(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return (w.clamp(min=0) * (-x) + (-w).clamp(min=0) * (-_log1m_p(x))).sum(1)

        le, lg = psi(we, xe), psi(wg, xg)
        losses = o1 * le + o2 * lg
        metrics = {"edited_term": le.detach().mean(), "generated_term": lg.detach().mean()}
    else:
        if vocab_size is None or isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError("form='code' needs vocab_size (int >= 2) for the -log(V-1) offset")
        n_pos = (wpos > 0).sum()
        n_neg = (upos > 0).sum()
        c_rows = chosen_rewards / n_pos.clamp(min=1).to(dt)
        r_rows = (upos * (_log1m_p(xg) - math.log(vocab_size - 1))).sum(1) / n_neg.clamp(min=1).to(dt)
        losses = -o1 * c_rows - o2 * r_rows
        metrics = {"edited_term": c_rows.detach().sum() / B, "generated_term": r_rows.detach().sum() / B}
    return finish(f"salt_loss({form})", losses.mean(), losses, chosen_rewards, rejected_rewards, metrics)
