"""ORPO (LOSSES.md B.2): NLL plus the log odds-ratio of length-averaged log-probs."""
from __future__ import annotations

import torch

from ._common import finish, logsig, pair_metrics
from .._validation import (
    check_number, check_positive_lengths, lengths_input, scalar_input, sequence_inputs, values_readable,
)
from .outputs import PreferenceLossOutput
from .reductions import log1mexp

__all__ = ["orpo_loss", "orpo_log_odds"]


def orpo_log_odds(avg_chosen_logps: torch.Tensor, avg_rejected_logps: torch.Tensor) -> torch.Tensor:
    """ORPO log odds-ratio ``z = (a_w - a_l) - [log(1 - e^{a_w}) - log(1 - e^{a_l})]``.

    Parameters
    ----------
    avg_chosen_logps, avg_rejected_logps : torch.Tensor
        ``[B]`` length-averaged log-probs, strictly negative.

    Returns
    -------
    torch.Tensor
        ``[B]`` log odds-ratios.
    """
    for n, t in (("avg_chosen_logps", avg_chosen_logps), ("avg_rejected_logps", avg_rejected_logps)):
        if values_readable(t) and (t.detach() >= 0).any():
            raise ValueError(f"{n} must be < 0 (a geometric-mean token probability P < 1); "
                             f"P = 1 makes log(1 - P) = -inf")
    return (avg_chosen_logps - avg_rejected_logps) - (log1mexp(avg_chosen_logps) - log1mexp(avg_rejected_logps))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """ORPO loss ``L = NLL - beta * mean_b log sigma(z_b)`` (TRL ``ORPOTrainer``, ``beta`` = lambda).

    Parameters
    ----------
    policy_chosen_logps, policy_rejected_logps : torch.Tensor
        ``[B]`` summed completion log-probs (averaged here by the lengths).
    chosen_lengths, rejected_lengths : torch.Tensor
        ``[B]`` completion token counts (> 0, else ``ValueError``).
    chosen_nll : torch.Tensor
        0-d NLL of the chosen sequences. TRL's decoder-only path averages it over
        prompt *and* completion tokens, the authors' code too unless
        ``--disable_prompt_loss``; prefkern takes it as given.
    beta : float, default 0.1
        lambda (TRL default 0.1; the authors' ``--alpha`` default is 1.0).

    Returns
    -------
    PreferenceLossOutput
        ``losses [B] = NLL + beta * L_OR_b`` with ``L_OR = -log sigma(z)`` (their mean is
        the loss); rewards ``beta * S/|y|``; metrics ``rewards/*``, ``logps/*``
        (averaged), ``nll_loss``, ``log_odds_ratio`` (mean log sigma(z)),
        ``log_odds_chosen`` (mean z).
    """
    beta = check_number("beta", beta)
    pc, pr = sequence_inputs([("policy_chosen_logps", policy_chosen_logps),
                              ("policy_rejected_logps", policy_rejected_logps)])
    lc = lengths_input("chosen_lengths", chosen_lengths, pc)
    lr = lengths_input("rejected_lengths", rejected_lengths, pc)
    check_positive_lengths("chosen_lengths", lc, "ORPO")
    check_positive_lengths("rejected_lengths", lr, "ORPO")
    if chosen_nll is None:
        raise ValueError("orpo_loss needs chosen_nll (0-d NLL of the chosen sequences)")
    nll = scalar_input("chosen_nll", chosen_nll, pc)
    avc, avr = pc / lc, pr / lr
    z = orpo_log_odds(avc, avr)
    ls = logsig(z)
    losses = nll - beta * ls
    chosen_rewards, rejected_rewards = beta * avc.detach(), beta * avr.detach()
    metrics = pair_metrics(chosen_rewards, rejected_rewards, avc, avr)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ls.detach().mean()
    metrics["log_odds_chosen"] = z.detach().mean()
    return finish("orpo_loss", nll - beta * ls.mean(), losses, chosen_rewards, rejected_rewards, metrics)
