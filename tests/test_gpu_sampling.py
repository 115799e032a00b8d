"""GPU checks of prefkern.sample and best_of_n (marked ``gpu``; skipped without CUDA)."""

import pytest
import torch

import prefkern
from prefkern import reference

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["triton", "cuda"]
FILTERS = [{}, {"top_k": 50}, {"top_p": 0.9}, {"min_p": 0.05}, {"top_k": 50, "top_p": 0.9},
           {"top_k": 1000, "top_p": 0.95, "min_p": 0.01, "temperature": 0.7}]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r,v", [(64, 32000), (32, 128256), (17, 50257), (5, 7)])
@pytest.mark.parametrize("kw", FILTERS)
def test_same_stream_as_torch_backend(backend, dtype, r, v, kw):
    """Token for token equal to the torch backend's counter-based draw, except within float rounding
    (the GPU backends use fast log/exp): at most 2% of rows may differ, and those only to kept tokens."""
    x = (torch.randn(r, v, device="cuda") * 3).to(dtype)
    seed = torch.randint(0, 2**62, (r,), device="cuda")
    ours, lp = prefkern.sample(x, seed=seed, offset=7, backend=backend, return_logprobs=True, **kw)
    ref = prefkern.sample(x, seed=seed, offset=7, backend="torch", **kw)
    probs = reference.sampling_probs(x, **{k: kw[k] for k in kw}, compute_dtype=torch.float64)
    assert bool((probs.gather(1, ours[:, None]) > 0).all()), "a filtered-out token was drawn"
    assert (ours != ref).float().mean().item() <= 0.02
    torch.testing.assert_close(lp.double(), probs.gather(1, ours[:, None]).squeeze(1).log(), atol=1e-3, rtol=1e-3)
    assert torch.equal(ours, prefkern.sample(x, seed=seed, offset=7, backend=backend, **kw))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kw", FILTERS[1:])
def test_distribution_one_million_draws(backend, kw):
    v = 1000
    row = torch.randn(1, v, device="cuda") * 2
    n = 1_000_000
    tokens = prefkern.sample(row, row_index=torch.zeros(n, dtype=torch.long, device="cuda"), seed=42,
                             backend=backend, **kw)
    probs = reference.sampling_probs(row, **kw)[0]
    freq = torch.bincount(tokens, minlength=v).double() / n
    assert bool((freq[probs == 0] == 0).all()), "a filtered-out token was drawn"
    assert torch.nn.functional.cosine_similarity(freq, probs, dim=0) > 0.999
    assert bool(((freq - probs).abs() <= 6 * (probs * (1 - probs) / n).sqrt() + 1e-4).all())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_edge_rows_on_gpu(backend):
    v = 128256
    x = torch.full((4, v), -float("inf"), device="cuda", dtype=torch.bfloat16)
    live = torch.tensor([0, 5, v - 1, 77777], device="cuda")
    x[torch.arange(4), live] = 1.0
    for kw in ({}, {"top_k": 3}, {"top_p": 0.5}, {"min_p": 0.5}):
        assert torch.equal(prefkern.sample(x, seed=1, backend=backend, **kw), live)
    y = torch.randn(3, v, device="cuda")
    y[1, 5] = float("nan")
    with pytest.raises(ValueError, match="output row 1"):
        prefkern.sample(y, seed=0, backend=backend)
    z = torch.randn(8, 1001, device="cuda")
    for kw in ({"top_k": 1}, {"top_p": 1e-7}, {"temperature": 0.0}):
        assert torch.equal(prefkern.sample(z, seed=3, backend=backend, **kw), z.argmax(-1))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    """Seeds and offsets as device tensors: capture once, replay per step with a new offset."""
    x = torch.randn(16, 32000, device="cuda", dtype=torch.bfloat16)
    seed = torch.arange(16, device="cuda")
    offset = torch.zeros(16, dtype=torch.long, device="cuda")
    prefkern.sample(x, seed=seed, offset=offset, top_k=50, top_p=0.9, backend=backend, validate=False)  # warm-up / JIT
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = prefkern.sample(x, seed=seed, offset=offset, top_k=50, top_p=0.9, backend=backend)
        sel = prefkern.best_of_n(x[:, :8].float(), k=2, method="rso", seed=seed[:1])
    for step in range(3):
        offset.fill_(step)
        g.replay()
        eager = prefkern.sample(x, seed=seed, offset=offset, top_k=50, top_p=0.9, backend=backend)
        assert torch.equal(out, eager)
    assert sel.indices.shape == (16, 2)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_temperature_overflow_and_numpy_scalars_gpu(backend):
    import numpy as np

    x = torch.full((2, 64), 10.0, device="cuda")
    x[:, 5] = 11.0
    with pytest.raises(ValueError, match="1 / temperature must be finite in float32"):
        prefkern.sample(x, temperature=torch.tensor([1.0, 1e-39], device="cuda"), backend=backend)
    with pytest.raises(ValueError, match="overflows float32"):
        prefkern.sample(x, temperature=1e-38, backend=backend)
    a = prefkern.sample(x, temperature=np.float32(0.5), top_k=np.int64(3), seed=np.int64(4), backend=backend)
    b = prefkern.sample(x, temperature=0.5, top_k=3, seed=4, backend=backend)
    assert torch.equal(a, b)
