"""Reductions from token log-probs, the [chosen; rejected] layout, and the SALT alignment helpers."""
from __future__ import annotations

import decimal
import math

import torch
from hypothesis import given, settings, strategies as st

import prefkern.losses as L

from loss_vectors_data import A_VECTORS
from test_losses_support import padded_tokens


def test_sequence_logps_sum_mean_lengths():
    tok = torch.tensor([[-1.0, -2.0, -3.0, 9.0], [-0.5, -0.5, 7.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])
    torch.testing.assert_close(L.sequence_logps(tok, mask), torch.tensor([-6.0, 6.5], dtype=torch.float64))
    torch.testing.assert_close(L.sequence_logps(tok, mask.bool(), average=True),
                               torch.tensor([-2.0, 3.25], dtype=torch.float64))
    torch.testing.assert_close(L.sequence_lengths(mask), torch.tensor([3, 2]))


def test_chosen_nll_is_token_weighted_not_mean_of_means():
    v = A_VECTORS["A2"]
    tok, mask = padded_tokens(v["chosen_tokens"], torch.float64)
    nll = L.chosen_nll(tok, mask)
    assert math.isclose(float(nll), 25.0 / 11.0, rel_tol=1e-12)  # (1 + 2 + 2 + 8 * 2.5) / 11
    mean_of_means = -(L.sequence_logps(tok, mask, average=True)).mean()
    assert not math.isclose(float(nll), float(mean_of_means), rel_tol=1e-6)


def test_split_concat_layout():
    chosen, rejected = torch.arange(6.0).reshape(3, 2), -torch.arange(6.0).reshape(3, 2)
    both = L.concat_chosen_rejected(chosen, rejected)
    assert both.shape == (6, 2)
    c, r = L.split_chosen_rejected(both)
    assert torch.equal(c, chosen) and torch.equal(r, rejected)


def test_preference_batch_from_tokens():
    pol = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0], [-3.0, -3.0, -3.0], [-0.5, -0.5, 0.0]],
                       dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    ref = pol - 0.25
    b = L.preference_batch(pol, mask, ref)
    torch.testing.assert_close(b.policy_chosen_logps, torch.tensor([-2.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(b.policy_rejected_logps, torch.tensor([-9.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(b.ref_chosen_logps, torch.tensor([-2.5, -2.25], dtype=torch.float64))
    torch.testing.assert_close(b.chosen_lengths, torch.tensor([2, 1]))
    torch.testing.assert_close(b.rejected_lengths, torch.tensor([3, 2]))
    assert math.isclose(float(b.chosen_nll), 4.0 / 3.0)
    assert not b.ref_chosen_logps.requires_grad


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=-700.0, max_value=-1e-300))
def test_log1mexp_matches_float64_reference(x):
    got = float(L.log1mexp(torch.tensor([x], dtype=torch.float64))[0])
    # independent reference: 400-digit decimal arithmetic (1 - e^x needs ~|x|/2.3 digits)
    with decimal.localcontext() as ctx:
        ctx.prec = 400
        ref = float((1 - decimal.Decimal(x).exp()).ln())
    assert math.isclose(got, ref, rel_tol=1e-12, abs_tol=1e-300)


def test_log1mexp_stability_and_errors():
    x = torch.tensor([-1e-20, -1e-8, -0.5, -40.0], dtype=torch.float32)
    got = L.log1mexp(x)
    assert torch.isfinite(got).all()
    naive = torch.log(1 - torch.exp(x))  # loses everything near 0 and at -40 in fp32
    assert not torch.isfinite(naive[0]) and naive[3] == 0
    torch.testing.assert_close(got.double(), torch.tensor([math.log(1e-20), math.log(1e-8), math.log(1 - math.exp(-0.5)),
                                                           -math.exp(-40.0)], dtype=torch.float64), rtol=1e-6, atol=0)
    assert L.log1mexp(torch.tensor([0.0])).item() == float("-inf")
    try:
        L.log1mexp(torch.tensor([0.1]))
    except ValueError as e:
        assert "x <= 0" in str(e)
    else:
        raise AssertionError("positive input accepted")


def _nw_optimum(g, e):
    """Independent optimal global-alignment score (match +1, mismatch -1, gap -1)."""
    prev = [-j for j in range(len(g) + 1)]
    for i in range(1, len(e) + 1):
        cur = [-i] + [0] * len(g)
        for j in range(1, len(g) + 1):
            cur[j] = max(prev[j - 1] + (1 if g[j - 1] == e[i - 1] else -1), prev[j] - 1, cur[j - 1] - 1)
        prev = cur
    return prev[-1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=9), st.lists(st.integers(0, 3), max_size=9))
def test_salt_alignment_is_optimal_and_consistent(g, e):
    ops = L.salt_alignment(g, e)
    score = sum(1 if o == "C" else -1 for o in ops)
    assert score == _nw_optimum(g, e)
    assert sum(o != "I" for o in ops) == len(g) and sum(o != "D" for o in ops) == len(e)
    wg, we, s = L.salt_token_weights(g, e)
    assert wg.shape == (len(g),) and we.shape == (len(e),) and s == "".join(ops)
    # replay the ops: C columns pair equal tokens, S columns unequal ones
    i = j = 0
    for o in ops:
        if o in "CS":
            assert (g[i] == e[j]) == (o == "C")
        i += o != "I"
        j += o != "D"


def test_salt_alignment_edge_cases_and_place_weights():
    assert L.salt_alignment([1, 2, 3], [1, 2, 3]) == ["C", "C", "C"]
    assert L.salt_alignment([], [4, 5]) == ["I", "I"]
    assert L.salt_alignment([4, 5], []) == ["D", "D"]
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    w = L.place_token_weights([[0.5, -0.1], torch.tensor([1.0, 1.0, 1.1, 1.1])], mask)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.5, -0.1, 0.0], [1.0, 1.0, 1.1, 1.1]]))
    try:
        L.place_token_weights([[1.0], [1.0]], mask)
    except ValueError as e:
        assert "row 0" in str(e)
    else:
        raise AssertionError


def test_wpo_weights_from_logits_match_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    w = L.wpo_sequence_weights(logits, labels, mask)
    p = logits.softmax(-1)
    for b in range(2):
        vals = [math.log(p[b, t, labels[b, t]]) - math.log(float((p[b, t] ** 2).sum())) for t in range(3) if mask[b, t]]
        assert math.isclose(float(w[b]), math.exp(sum(vals) / len(vals)), rel_tol=1e-12)
    assert not w.requires_grad


def test_preference_batch_empty_completions():
    pol = torch.tensor([[-1.0, -1.0], [-2.0, 0.0], [-3.0, -3.0], [-0.5, -0.5]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]])  # pair 1's rejected completion is empty
    try:
        L.preference_batch(pol, mask)
    except ValueError as e:
        assert "pairs [1]" in str(e)
    else:
        raise AssertionError("empty completion accepted silently")
    b = L.preference_batch(pol, mask, pol - 1, empty_completions="drop")
    torch.testing.assert_close(b.kept, torch.tensor([0]))
    torch.testing.assert_close(b.policy_chosen_logps, torch.tensor([-2.0], dtype=torch.float64))
    torch.testing.assert_close(b.ref_rejected_logps, torch.tensor([-8.0], dtype=torch.float64))
    assert math.isclose(float(b.chosen_nll), 1.0)
    k = L.preference_batch(pol, mask, empty_completions="keep")
    torch.testing.assert_close(k.policy_rejected_logps, torch.tensor([-6.0, 0.0], dtype=torch.float64))
