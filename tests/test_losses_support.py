"""Shared helpers for the tests/test_losses_*.py files (no tests here; imported by the others)."""
from __future__ import annotations

import torch

from loss_vectors_data import A_VECTORS

DTYPES = [torch.float64, torch.float32]
RTOL = 1e-6
ATOL = 1e-9


def t(x, dtype=torch.float64, requires_grad=False):
    return torch.tensor(x, dtype=dtype, requires_grad=requires_grad)


def close(actual, expected, rtol=RTOL, atol=ATOL):
    """Assert ``actual`` (tensor) matches ``expected`` (number / list) elementwise, in float64."""
    exp = torch.as_tensor(expected, dtype=torch.float64)
    act = actual.detach().to(torch.float64).reshape(exp.shape)
    torch.testing.assert_close(act, exp, rtol=rtol, atol=atol)


def padded_tokens(seqs, dtype, pad_value=float("nan")):
    """[B, T] token log-probs padded with ``pad_value`` (NaN: masked slots must never leak) + mask."""
    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), pad_value, dtype=dtype)
    m = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s, dtype=dtype)
        m[i, : len(s)] = True
    return x, m


def a_inputs(name, dtype):
    """Per-sequence tensors of a section-J vector plus the chosen NLL built from its tokens."""
    from prefkern.losses import chosen_nll

    v = A_VECTORS[name]
    toks, mask = padded_tokens(v["chosen_tokens"], dtype)
    return dict(
        policy_chosen_logps=t(v["pc"], dtype), policy_rejected_logps=t(v["pr"], dtype),
        ref_chosen_logps=t(v["rc"], dtype), ref_rejected_logps=t(v["rr"], dtype),
        chosen_lengths=torch.tensor(v["lc"]), rejected_lengths=torch.tensor(v["lr"]),
        chosen_nll=chosen_nll(toks, mask),
    )
