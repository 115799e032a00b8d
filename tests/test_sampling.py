"""prefkern.sample on every backend this machine can run: distributions, masks, exact seeds, edge cases."""

import math

import pytest
import torch

import prefkern
from prefkern import reference
from prefkern.dispatch import backend_status
from prefkern.ops.sampling import sample_op

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FILTERS = [
    {},
    {"top_k": 7},
    {"top_p": 0.7},
    {"min_p": 0.05},
    {"top_k": 12, "top_p": 0.8},
    {"top_k": 20, "top_p": 0.9, "min_p": 0.02, "temperature": 0.7},
]


def backends():
    return [b for b in ("native", "triton") if backend_status(b, CPU)[0]] + ["torch"]


def kernel_backends():
    return [b for b in ("native", "triton") if backend_status(b, CPU)[0]]


def truth_probs(x, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """Float64, one row at a time with Python sorting: independent of prefkern.reference."""
    out = []
    for row in x.double().tolist():
        z = [v / temperature for v in row]
        m = max(z)
        w = [math.exp(v - m) for v in z]
        keep = [True] * len(z)
        if min_p is not None:
            keep = [k and wi >= min_p for k, wi in zip(keep, w)]
        if top_k is not None and 0 < top_k < len(z):
            kth = sorted(z, reverse=True)[top_k - 1]
            keep = [k and v >= kth for k, v in zip(keep, z)]
        if top_p is not None and top_p < 1:
            tot = sum(wi for wi, k in zip(w, keep) if k)
            q = [wi / tot if k else 0.0 for wi, k in zip(w, keep)]
            order = sorted(range(len(z)), key=lambda i: -q[i])
            before, thr = 0.0, None
            for i in order:
                if before >= top_p:
                    break
                thr = q[i]
                before += q[i]
            keep = [k and qi >= thr for k, qi in zip(keep, q)]
        tot = sum(wi for wi, k in zip(w, keep) if k)
        out.append([wi / tot if k else 0.0 for wi, k in zip(w, keep)])
    return torch.tensor(out, dtype=torch.float64)


def draw_many(backend, row, n, seed=0, **kw):
    """n draws from one logits row through row_index (no copy), one token per output row."""
    idx = torch.zeros(n, dtype=torch.long)
    return prefkern.sample(row.unsqueeze(0), row_index=idx, seed=seed, backend=backend, **kw)


# ---- the references --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", FILTERS + [{"top_p": 0.3, "min_p": 0.2}, {"top_k": 1}, {"top_p": 1e-6}])
def test_reference_probs_match_python_truth(kw):
    x = torch.randn(5, 41) * 2
    x[1, :5] = x[1, 5]  # ties at the filter boundaries
    got = reference.sampling_probs(x, row_index=None, **kw)
    torch.testing.assert_close(got, truth_probs(x, **kw), atol=1e-12, rtol=1e-9)


def test_reference_rng_is_the_documented_hash():
    key = reference.sampling_row_key(torch.tensor([0, 2**40 + 3, -1]), torch.tensor([0, 5, 2**33]), torch.tensor([0, 1, 2]))
    assert key.dtype == torch.int64 and bool(((key >= 0) & (key < 2**32)).all())

    def mix(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    s, o, r = (2**40 + 3) & (2**64 - 1), 5, 1
    k = mix(mix(mix(mix(mix((s & 0xFFFFFFFF) ^ 0x9E3779B9) ^ (s >> 32)) ^ (o & 0xFFFFFFFF)) ^ (o >> 32)) ^ r)
    assert int(key[1]) == k
    u = reference.sampling_uniforms(key[1:2].unsqueeze(-1), torch.tensor([3]))
    h = mix(mix(k ^ 3) + 0x6A09E667)
    assert float(u) == ((h >> 9) * 2 + 1) * 2.0**-24
    big = reference.sampling_uniforms(key.unsqueeze(-1), torch.arange(100000))
    assert float(big.min()) > 0 and float(big.max()) < 1 and abs(float(big.mean()) - 0.5) < 3e-3


# ---- distribution and masks ------------------------------------------------------------------------

@pytest.mark.parametrize("kw", FILTERS)
def test_native_distribution_many_draws(kw):
    if not backend_status("native", CPU)[0]:
        pytest.skip("native extension not built")
    row = torch.randn(53) * 1.5
    n = 200_000
    tokens = draw_many("native", row, n, seed=123, **kw)
    probs = truth_probs(row[None], **{k: v for k, v in kw.items()})[0]
    freq = torch.bincount(tokens, minlength=53).double() / n
    assert bool((freq[probs == 0] == 0).all()), "a filtered-out token was drawn"
    sd = (probs * (1 - probs) / n).sqrt()
    assert bool(((freq - probs).abs() <= 5 * sd + 2e-4).all()), (freq - probs).abs().max()
    cos = torch.nn.functional.cosine_similarity(freq, probs, dim=0)
    assert cos > 0.999


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_distribution_other_backends(backend):
    if not backend_status(backend, CPU)[0]:
        pytest.skip(f"{backend} cannot run here")
    row = torch.randn(37) * 1.5
    n = 300 if backend == "triton" else 100_000  # Triton also matches the torch stream token for token
    kw = {"top_k": 9, "top_p": 0.85}
    tokens = draw_many(backend, row, n, seed=7, **kw)
    probs = truth_probs(row[None], **kw)[0]
    freq = torch.bincount(tokens, minlength=37).double() / n
    assert bool((freq[probs == 0] == 0).all())
    assert bool(((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt() + 1e-3).all())
    assert torch.nn.functional.cosine_similarity(freq, probs, dim=0) > (0.97 if backend == "triton" else 0.995)


def test_torch_multinomial_with_generator():
    row = torch.randn(20)
    g = torch.Generator().manual_seed(3)
    a = draw_many("torch", row, 50_000, seed=None, generator=g, top_k=5)
    g.manual_seed(3)
    b = draw_many("torch", row, 50_000, seed=None, generator=g, top_k=5)
    assert torch.equal(a, b)
    probs = truth_probs(row[None], top_k=5)[0]
    freq = torch.bincount(a, minlength=20).double() / 50_000
    assert bool((freq[probs == 0] == 0).all()) and bool(((freq - probs).abs() < 0.01).all())


# ---- exact seeds -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", FILTERS)
def test_same_tokens_as_torch_backend(backend, dtype, kw):
    """Every backend draws from the same counter-based stream: same seed, same tokens."""
    r, v = (8, 300) if backend == "triton" else (64, 1000)
    x = (torch.randn(r, v) * 2).to(dtype)
    seed = torch.randint(-2**62, 2**62, (r,))
    offset = torch.randint(0, 2**40, (r,))
    ours, lp = prefkern.sample(x, seed=seed, offset=offset, backend=backend, return_logprobs=True, **kw)
    ref, lp_ref = prefkern.sample(x, seed=seed, offset=offset, backend="torch", return_logprobs=True, **kw)
    assert torch.equal(ours, ref)
    again = prefkern.sample(x, seed=seed, offset=offset, backend=backend, **kw)
    assert torch.equal(ours, again)
    probs = truth_probs(x.float(), **kw)
    expect = probs.gather(1, ours[:, None]).squeeze(1).log()
    torch.testing.assert_close(lp.double(), expect, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", backends())
def test_seed_and_offset_change_the_stream(backend):
    x = torch.randn(16, 64)
    a = prefkern.sample(x, seed=1, backend=backend)
    assert torch.equal(a, prefkern.sample(x, seed=1, offset=0, backend=backend))
    assert not torch.equal(a, prefkern.sample(x, seed=2, backend=backend))
    assert not torch.equal(a, prefkern.sample(x, seed=1, offset=2**33, backend=backend))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(prefkern.sample(x, generator=g1, backend=backend), prefkern.sample(x, generator=g2, backend=backend))


# ---- reductions to argmax and edge cases -------------------------------------------------------------

@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-7}, {"min_p": 1.0}, {"temperature": 0.0},
                                {"temperature": 0.0, "top_k": 5}])
def test_reduces_to_argmax(backend, kw):
    x = torch.randn(12, 2049) * 3  # V not a multiple of any block
    tokens, lp = prefkern.sample(x, seed=11, backend=backend, return_logprobs=True, **kw)
    assert torch.equal(tokens, x.argmax(dim=-1))
    torch.testing.assert_close(lp, torch.zeros(12), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_inf_rows_except_one_and_masks(backend, dtype):
    v = 133
    x = torch.full((6, v), -float("inf"))
    live = torch.tensor([0, 5, 77, 132, 64, 1])
    x[torch.arange(6), live] = torch.randn(6)
    for kw in ({}, {"top_k": 3}, {"top_p": 0.5}, {"min_p": 0.5}):
        assert torch.equal(prefkern.sample(x.to(dtype), seed=4, backend=backend, **kw), live)
    y = torch.randn(20 if backend == "triton" else 200, v)
    y[:, ::3] = -float("inf")
    t = prefkern.sample(y.to(dtype), seed=5, backend=backend, top_p=0.95)
    assert bool((t % 3 != 0).all())


@pytest.mark.parametrize("backend", backends())
def test_nan_and_inf_logits_raise(backend):
    x = torch.randn(4, 50)
    x[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"logits row 2 \(output row 2\) contains NaN"):
        prefkern.sample(x, seed=0, backend=backend)
    with pytest.raises(ValueError, match="contains NaN"):
        prefkern.sample(x, seed=0, backend=backend, top_k=3)
    t = prefkern.sample(x, seed=0, backend=backend, validate=False)
    assert int(t[2]) == -1 and bool((t[[0, 1, 3]] >= 0).all())
    y = torch.randn(3, 50)
    y[1, 3] = float("inf")
    with pytest.raises(ValueError, match="output row 1"):
        prefkern.sample(y, seed=0, backend=backend)
    z = torch.full((2, 50), -float("inf"))
    with pytest.raises(ValueError, match="no finite value"):
        prefkern.sample(z, seed=0, backend=backend)


@pytest.mark.parametrize("backend", backends())
def test_empty_noncontiguous_and_row_index(backend):
    empty = prefkern.sample(torch.randn(0, 10), seed=0, backend=backend, return_logprobs=True)
    assert empty[0].shape == (0,) and empty[0].dtype == torch.int64 and empty[1].shape == (0,)
    none = prefkern.sample(torch.randn(3, 10), row_index=torch.zeros(0, dtype=torch.long), seed=0, backend=backend)
    assert none.shape == (0,)
    base = torch.randn(10, 300)
    rows = base[::2, 20:150]
    cols = torch.randn(130, 5).t()
    for x in (rows, cols):
        assert not x.is_contiguous()
        ref = prefkern.sample(x.contiguous(), seed=3, top_k=10, backend="torch")
        assert torch.equal(prefkern.sample(x, seed=3, top_k=10, backend=backend), ref)
    idx = torch.tensor([4, 4, 0, 2, 4], dtype=torch.int32)
    a = prefkern.sample(rows, row_index=idx, seed=8, top_p=0.9, backend=backend)
    b = prefkern.sample(rows.index_select(0, idx.long()).contiguous(), seed=8, top_p=0.9, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backends())
def test_per_row_parameter_tensors(backend):
    x = torch.randn(6, 90) * 2
    temp = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.8])
    k = torch.tensor([0, 5, 3, 1, 90, 10])
    p = torch.tensor([1.0, 0.5, 0.9, 0.2, 1.0, 0.6])
    mp = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.3, 0.0])
    seed = torch.arange(6) * 1000
    tokens = prefkern.sample(x, temperature=temp, top_k=k, top_p=p, min_p=mp, seed=seed, backend=backend)
    assert int(tokens[1]) == int(x[1].argmax()) and int(tokens[3]) == int(x[3].argmax())
    for i in range(6):
        one = prefkern.sample(x[i:i + 1], temperature=float(temp[i]), top_k=int(k[i]), top_p=float(p[i]),
                              min_p=float(mp[i]), seed=seed[i:i + 1], backend="torch")
        probs = truth_probs(x[i:i + 1], float(temp[i]) or 1.0, int(k[i]), float(p[i]), float(mp[i]))[0]
        assert probs[tokens[i]] > 0
        if i != 0:  # the key includes the output row, so only row 0 can be compared with a 1-row call
            continue
        assert torch.equal(one, tokens[:1])


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(3, 10)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        prefkern.sample(x.numpy())
    with pytest.raises(TypeError, match="logits must have dtype"):
        prefkern.sample(x.to(torch.int32))
    with pytest.raises(ValueError, match=r"logits must have shape \[L, V\]"):
        prefkern.sample(x[0])
    with pytest.raises(ValueError, match="temperature must be finite numbers >= 0"):
        prefkern.sample(x, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]; top_p\[1\]"):
        prefkern.sample(x, top_p=torch.tensor([0.5, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"min_p must be in \[0, 1\]"):
        prefkern.sample(x, min_p=1.5)
    with pytest.raises(TypeError, match="top_k must be an int"):
        prefkern.sample(x, top_k=2.5)
    with pytest.raises(TypeError, match="top_k must be an int64 or int32"):
        prefkern.sample(x, top_k=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"top_k must be one number or a tensor of shape \[R\] = \[3\]"):
        prefkern.sample(x, top_k=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"row_index must be in \[0, 3\)"):
        prefkern.sample(x, row_index=torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="row_index must be an int64 or int32"):
        prefkern.sample(x, row_index=torch.tensor([0.0]))
    with pytest.raises(TypeError, match="seed must be a number or a tensor"):
        prefkern.sample(x, seed="1")
    with pytest.raises(ValueError, match="seed is on meta"):
        prefkern.sample(x, seed=torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="vocabulary dimension"):
        prefkern.sample(torch.randn(2, 0))
    with pytest.raises(ValueError, match="backend must be one of"):
        prefkern.sample(x, backend="fast")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
        prefkern.sample(x, backend="cuda")


def test_opcheck_fake_registration():
    r = 4
    args = (torch.randn(3, 17), torch.tensor([0, 1, 2, 2]), torch.ones(r), torch.full((r,), 5, dtype=torch.long),
            torch.full((r,), 0.9), torch.zeros(r), torch.arange(r), torch.zeros(r, dtype=torch.long), "torch")
    torch.library.opcheck(sample_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", FILTERS[1:] + [{"top_k": 3000}, {"top_p": 0.999}, {"top_p": 0.3, "min_p": 0.5}])
def test_large_vocab_native_guess_path(dtype, kw):
    """V >= 4096 takes the native kernel's sampled-guess path for top-k / top-p: still exact."""
    if not backend_status("native", CPU)[0]:
        pytest.skip("native extension not built")
    x = (torch.randn(24, 40000) * 3).to(dtype)
    x[3] = 0.0  # all tied: every guess keeps everything
    x[4, ::2] = -float("inf")
    seed = torch.arange(24) + 99
    ours, lp = prefkern.sample(x, seed=seed, backend="native", return_logprobs=True, **kw)
    ref, lp_ref = prefkern.sample(x, seed=seed, backend="torch", return_logprobs=True, **kw)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(lp, lp_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.0}, {"top_k": 12, "top_p": 0.8}, {"min_p": 0.2},
                                {"min_p": 0.01, "top_p": 0.9}, {"top_k": 4500, "top_p": 0.99}])
def test_triton_split_rows(kw):
    """V = 5000 with 2048-wide tiles: pass 1 runs in three programs per row, merged by the finisher;
    top-p after top-k / min-p runs on the compacted survivors (top_k=4500 overflows the 4096 scratch)."""
    if not backend_status("triton", CPU)[0]:
        pytest.skip("triton cannot run here")
    x = torch.randn(4, 5000) * 3
    x[1, :2500] = -float("inf")  # a whole chunk of -inf
    x[2, 4999] = 50.0  # the maximum in the last chunk
    x[3, [10, 4000]] = 60.0  # tied maxima in different chunks: greedy takes the first
    seed = torch.tensor([1, 2, 3, 4])
    ours, lp = prefkern.sample(x, seed=seed, backend="triton", return_logprobs=True, **kw)
    ref, lp_ref = prefkern.sample(x, seed=seed, backend="torch", return_logprobs=True, **kw)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(lp, lp_ref, atol=2e-5, rtol=1e-5)
    if kw.get("temperature") == 0.0:
        assert int(ours[3]) == 10


def test_more_than_2_pow_31_elements_native():
    """64-bit row offsets: the sampled row starts past element 2^31 of the buffer (only the rows read are
    ever touched, so the 4.3 GB stay address space)."""
    v = 1024
    r = 2**31 // v + 2
    assert r * v > 2**31
    try:
        logits = torch.empty(r, v, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("cannot reserve 4.3 GB of address space")
    logits[0].zero_()
    logits[r - 1].zero_()
    logits[r - 1, 7] = 60.0  # dominant by e^60: every draw from that row is token 7
    logits[0, 3] = 60.0
    rows = torch.tensor([r - 1, 0, r - 1])
    for kw in ({}, {"top_k": 5, "top_p": 0.9}, {"min_p": 0.1}):
        tokens, logps = prefkern.sample(logits, row_index=rows, seed=torch.tensor([1, 2, 3]), return_logprobs=True,
                                        backend="native", **kw)
        assert tokens.tolist() == [7, 3, 7], kw
        assert logps.abs().max() < 1e-6, kw


# ---- Triton: peeled rows, noise bounds, skipped tiles ------------------------------------------------

def _triton_or_skip():
    if not backend_status("triton", CPU)[0]:
        pytest.skip("triton cannot run here")


def test_gumbel_noise_bounds_hold():
    """G_MIN / G_MAX bound g = -log(-log u) over every u = (2k + 1) 2^-24 of the stream: the float64 extremes
    (g is increasing in u: k = 0 and k = 2^23 - 1) lie inside, within 1e-4, and so does the float32 noise."""
    pytest.importorskip("triton")
    from prefkern.kernels import sampling as kernels

    g_min, g_max = float(kernels.G_MIN.value), float(kernels.G_MAX.value)
    u = [2.0**-24, 1.0 - 2.0**-24]
    exact = [-math.log(-math.log(x)) for x in u]
    assert g_min < exact[0] < g_min + 1e-4 and g_max - 1e-4 < exact[1] < g_max
    k = torch.cat([torch.arange(0, 4096), torch.arange(2**23 - 4096, 2**23), torch.randint(0, 2**23, (100_000,))])
    u32 = ((2 * k + 1).double() * 2.0**-24).float()
    g32 = -torch.log(-torch.log(u32))
    assert float(g32.min()) >= g_min and float(g32.max()) <= g_max
    # and in float32 the bounds are what the kernels add: rounding to float32 keeps them outside
    assert float(torch.tensor(g_min)) < exact[0] and float(torch.tensor(g_max)) > exact[1]
    noise = reference.sampling_gumbel(reference.sampling_row_key(torch.tensor([5]), torch.tensor([0]),
                                                                 torch.tensor([0])).unsqueeze(-1),
                                      torch.arange(200_000))
    assert g_min <= float(noise.min()) and float(noise.max()) <= g_max


try:  # a kernel that writes the Triton noise of one row key (jitted at module level: Triton resolves globals)
    import triton
    import triton.language as tl
    from prefkern.kernels import sampling as triton_sampling

    @triton.jit
    def _noise_kernel(out_ptr, key, N: tl.constexpr):
        cols = tl.arange(0, N)
        tl.store(out_ptr + cols, triton_sampling._gumbel(key, cols))
except ImportError:
    _noise_kernel = None


def test_triton_noise_matches_the_reference_stream():
    """The Triton noise (its outer log a short polynomial) is the torch stream's within float32 rounding of
    values up to 16.6 (1 ulp = 1.9e-6), and inside [G_MIN, G_MAX], over 2^20 columns of one row key."""
    _triton_or_skip()
    n = 1 << 20
    key = reference.sampling_row_key(torch.tensor([5]), torch.tensor([0]), torch.tensor([0]))
    out = torch.empty(n)
    _noise_kernel[(1,)](out, int(key), n)
    ref = reference.sampling_gumbel(key.unsqueeze(-1), torch.arange(n))[0]
    assert float((out - ref).abs().max()) <= 1.5e-6
    g_min, g_max = float(triton_sampling.G_MIN.value), float(triton_sampling.G_MAX.value)
    assert g_min <= float(out.min()) and float(out.max()) <= g_max


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.0}, {"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1},
                                {"top_k": 12, "top_p": 0.8}])
@pytest.mark.parametrize("v,pad,shift", [(37, 0, 0), (37, 5, 1), (5003, 3, 0)])
def test_triton_peeled_rows_match_torch(dtype, kw, v, pad, shift):
    """Odd V, row strides that are not multiples of 8 and a view starting ``shift`` elements in: every row
    starts somewhere else in its 16-byte group, so each has a head, an aligned body and a tail. Same tokens
    as the torch stream, the maximum (for greedy rows) put in the head, the tail or the body."""
    _triton_or_skip()
    r = 6
    base = (torch.randn(r, v + pad + shift) * 2).to(dtype)
    x = base[:, shift:shift + v]
    x[0, 0] = 40.0  # head of row 0 only if the row is misaligned; row 0 starts the buffer
    x[1, 1] = 40.0  # in the head of row 1 (it starts 1 element after a 16-byte boundary at most)
    x[2, v - 1] = 40.0  # the tail
    x[3, v // 2] = 40.0  # the body
    seed = torch.arange(r) + 17
    offset = torch.arange(r) * 3
    ours, lp = prefkern.sample(x, seed=seed, offset=offset, backend="triton", return_logprobs=True, **kw)
    ref, lp_ref = prefkern.sample(x, seed=seed, offset=offset, backend="torch", return_logprobs=True, **kw)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(lp, lp_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_greedy_ties_across_head_tail_and_chunks(dtype):
    """Tied maxima: the lowest column wins wherever the copies sit (pass-1 program 0 also holds the row's tail,
    its highest columns)."""
    _triton_or_skip()
    v = 5003  # fp32 row 1 starts at 5003: head 1, tail 5001..5002; bf16: head 5, tail 4997..5002
    x = torch.randn(4, v)
    x[0, [0, 4000]] = 9.0  # head (row 0 starts aligned: column 0 is the body) and another chunk
    x[1, [3000, 5002]] = 9.0  # chunk 1 and the tail of chunk 0's program
    x[2, [0, 5002]] = 9.0
    x[3, [2500, 2501, 4999]] = 9.0
    tokens = prefkern.sample(x.to(dtype), temperature=0.0, backend="triton")
    assert tokens.tolist() == [0, 3000, 0, 2500]


def test_triton_skipped_tiles_give_the_same_tokens():
    """Rows whose bulk lies far below the maximum: tiles that cannot beat a key already seen (tile max + G_MAX
    below it) skip the noise, in pass 1 (V = 20000: two tiles per program, the first holding a large logit) and
    in the draw. The tokens are still the torch stream's, for several seeds."""
    _triton_or_skip()
    r, v = 6, 20000
    x = torch.randn(r, v) - 40.0
    x[:, ::4096] = torch.randn(r, 5)  # the first tile of every pass-1 program
    x[:, 4100] = -19.0  # just above the skip bound of a tile after a key of about 0: drawn, not skipped
    x[torch.arange(r), torch.randint(0, v, (r,))] = torch.randn(r) + 1.0
    for kw in ({}, {"min_p": 1e-9}, {"top_k": 4}):
        for seed in range(2):
            ours = prefkern.sample(x, seed=seed, backend="triton", **kw)
            ref = prefkern.sample(x, seed=seed, backend="torch", **kw)
            assert torch.equal(ours, ref), (kw, seed)
