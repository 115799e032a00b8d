"""best_of_n ranks NaN below every number; RSO's explicit uniforms are checked; sample's options
(tiny temperatures, NumPy scalars, int64 seeds, torch.compile on the CPU).

Truth for the selection is a float64 Python sort written here (NaN after -inf, ties to the lower index)."""


import numpy as np
import pytest
import torch

import prefkern
from prefkern.dispatch import backend_status

CPU = torch.device("cpu")
NAN, INF = float("nan"), float("inf")


def backends():
    return [b for b in ("native", "triton") if backend_status(b, CPU)[0]] + ["torch"]


def truth_order(row):
    """Local indices of one row, best first: numbers descending (ties: lower index), then NaN by index."""
    return sorted(range(len(row)), key=lambda j: (row[j] != row[j], -row[j] if row[j] == row[j] else 0.0, j))


SCORES = torch.tensor([
    [NAN, -INF, -INF, 1.0],
    [NAN, -INF, NAN, -INF],
    [NAN, NAN, NAN, NAN],
    [2.0, NAN, 2.0, -1.0],
    [-INF, NAN, -INF, -INF],
])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nan_ranks_below_minus_inf_in_argmax_and_topk(dtype):
    s = SCORES.to(dtype)
    want = torch.tensor([truth_order(r) for r in SCORES.double().tolist()])
    assert torch.equal(prefkern.best_of_n(s).local, want[:, :1])
    for k in (1, 2, 4):
        sel = prefkern.best_of_n(s, k=k, method="topk")
        assert torch.equal(sel.local, want[:, :k])
        assert torch.equal(sel.valid, torch.isfinite(s.gather(1, want[:, :k])))
    assert prefkern.best_of_n(s).local[0, 0] == 3  # a number beats NaN
    assert prefkern.best_of_n(s).local[1, 0] == 1  # -inf beats NaN


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_rso_takes_nan_candidates_only_after_every_number(beta):
    s = SCORES.clone()
    u = torch.rand(5, 4, 4)
    sel = prefkern.best_of_n(s, k=4, method="rso", beta=beta, uniforms=u)
    for i, row in enumerate(s.tolist()):
        got = sel.local[i].tolist()
        assert sorted(got) == [0, 1, 2, 3]
        n_numbers = sum(v == v for v in row)
        assert all(row[j] == row[j] for j in got[:n_numbers]), (i, got)
        assert got[n_numbers:] == [j for j in range(4) if row[j] != row[j]]  # NaN last, in index order


def test_rso_uniforms_are_checked():
    s = torch.randn(2, 3)
    good = torch.rand(2, 1, 3)
    for bad_value in (1.0, -0.1, NAN, INF):
        bad = good.clone()
        bad[1, 0, 2] = bad_value
        with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\).*uniforms\[1, 0, 2\]"):
            prefkern.best_of_n(s, method="rso", uniforms=bad)
    with pytest.raises(TypeError, match="uniforms must be a torch.Tensor"):
        prefkern.best_of_n(s, method="rso", uniforms=good.numpy())
    with pytest.raises(TypeError, match="uniforms must be a floating-point tensor"):
        prefkern.best_of_n(s, method="rso", uniforms=torch.zeros(2, 1, 3, dtype=torch.long))
    sel = prefkern.best_of_n(s, method="rso", uniforms=torch.zeros(2, 1, 3), beta=np.float32(0.5))
    assert torch.equal(sel.local, s.argmax(dim=1, keepdim=True)), "u = 0 accepts the first candidate at the max"
    with pytest.raises(ValueError, match="seed must be <="):
        prefkern.best_of_n(s, method="rso", seed=2**63)


# ---- sample: options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends())
def test_tiny_positive_temperature_is_rejected_clearly(backend):
    x = torch.randn(3, 11)
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or >= 2.939e-39"):
        prefkern.sample(x, temperature=1e-40, backend=backend)
    with pytest.raises(ValueError, match="1 / temperature must be finite in float32"):
        prefkern.sample(x, temperature=torch.tensor([1.0, 1e-39, 1.0]), backend=backend)
    # a temperature that is representable but scales the logits past float32: a message that says so
    big = torch.full((1, 5), 10.0)
    big[0, 2] = 11.0
    with pytest.raises(ValueError, match="divided by temperature.*overflows float32"):
        prefkern.sample(big, temperature=1e-38, backend=backend)
    # 0 is greedy, and the smallest allowed temperature is accepted
    assert prefkern.sample(big, temperature=0.0, backend=backend).item() == 2
    assert prefkern.sample(big * 1e-30, temperature=3e-39, backend=backend).item() == 2


@pytest.mark.parametrize("backend", backends())
def test_numpy_scalars_are_numbers(backend):
    x = torch.randn(4, 23)
    want = prefkern.sample(x, temperature=0.7, top_k=5, top_p=0.9, min_p=0.01, seed=3, offset=2, backend=backend)
    got = prefkern.sample(x, temperature=np.float32(0.7), top_k=np.int64(5), top_p=np.float64(0.9),
                          min_p=np.float32(0.01), seed=np.int64(3), offset=np.int32(2), backend=backend)
    assert torch.equal(got, want)


def test_seed_and_offset_outside_int64_raise():
    x = torch.randn(2, 9)
    with pytest.raises(ValueError, match="seed must be <= 9223372036854775807"):
        prefkern.sample(x, seed=2**63)
    with pytest.raises(ValueError, match="seed must be >= -9223372036854775808"):
        prefkern.sample(x, seed=-2**63 - 1)
    with pytest.raises(ValueError, match="offset must be <="):
        prefkern.sample(x, seed=1, offset=2**64)
    with pytest.raises(TypeError, match="top_k must be an int"):
        prefkern.sample(x, top_k=np.float32(2.0))
    assert prefkern.sample(x, seed=2**63 - 1).shape == (2,)


@pytest.mark.parametrize("kw", [{}, {"top_k": 5, "top_p": 0.8}, {"min_p": 0.1, "temperature": 0.5}])
def test_torch_compile_fullgraph_sample_on_cpu(kw):
    x = torch.randn(6, 40)
    seed = torch.arange(6)

    def draw(logits, seed, offset):
        return prefkern.sample(logits, seed=seed, offset=offset, return_logprobs=True, **kw)

    compiled = torch.compile(draw, fullgraph=True, backend="inductor")
    for step in range(2):
        off = torch.full((6,), step)
        tok_c, lp_c = compiled(x, seed, off)
        tok_e, lp_e = draw(x, seed, off)
        assert torch.equal(tok_c, tok_e)
        torch.testing.assert_close(lp_c, lp_e)


def test_candidate_scratch_only_when_top_p_combines():
    """The per-row candidate scratch is needed only where top-p follows top-k or min-p; the decision reads the
    arguments, never tensor values (CUDA-graph safe), and a tensor argument counts as "may combine"."""
    from prefkern.ops.sampling import _may_combine_top_p

    v = 100
    assert not _may_combine_top_p(None, 0.9, None, v)           # top-p alone
    assert not _may_combine_top_p(50, None, None, v)            # top-k alone
    assert not _may_combine_top_p(50, 1.0, 0.1, v)              # top-p off
    assert not _may_combine_top_p(v, 0.9, None, v)              # top-k off (k = V)
    assert _may_combine_top_p(50, 0.9, None, v)
    assert _may_combine_top_p(None, 0.9, 0.05, v)
    assert _may_combine_top_p(torch.tensor([5]), 0.9, None, v)
    assert _may_combine_top_p(None, torch.tensor([1.0]), 0.05, v)


@pytest.mark.skipif(not backend_status("triton", torch.device("cpu"))[0], reason="triton not available")
def test_top_p_alone_samples_the_same_without_the_scratch():
    from prefkern.ops._backends import triton_kernels

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 300, generator=g)
    rows = torch.arange(3)
    f32 = lambda x: torch.full((3,), x, dtype=torch.float32)  # noqa: E731
    i64 = lambda x: torch.full((3,), x, dtype=torch.int64)  # noqa: E731
    args = (logits, rows, f32(0.8), i64(0), f32(0.7), f32(0.0), i64(11), i64(0))
    launch = triton_kernels("sampling").sample
    with_scratch = launch(*args, candidates=True)
    without = launch(*args, candidates=False)
    torch.testing.assert_close(with_scratch[0], without[0])
    torch.testing.assert_close(with_scratch[1], without[1])
