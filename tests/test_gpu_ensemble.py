"""GPU-only ensemble checks (marked ``gpu``; skipped without CUDA, run by benchmarks/gpu_check.sh)."""

import numpy as np
import pytest
import torch

import prefkern
from prefkern import reference
from tolerance import assert_within_torch_error

pytestmark = pytest.mark.gpu


def _truth(hidden, last, weight, bias):
    x = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].double()
    return weight.double() @ x.t() + bias.double()[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,t,h,k", [(1, 1, 16, 1), (37, 5, 1000, 5), (4096, 2, 4096, 8), (513, 3, 3072, 16),
                                     (64, 2, 256, 40), (6, 2, 1001, 3)])
@pytest.mark.parametrize("method", ["mean", "wco", "uwo"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_head_gpu(dtype, b, t, h, k, method, backend):
    head = prefkern.EnsembleRewardHead(h, k, method=method, device="cuda", dtype=dtype)
    with torch.no_grad():
        head.weight.normal_(0, h ** -0.5)
    head.set_normalization(torch.randn(k), torch.rand(k) + 0.5)
    hidden = torch.randn(b, t, h, device="cuda").to(dtype)
    lengths = torch.randint(1, t + 1, (b,), device="cuda")
    last = lengths - 1
    out = head(hidden, lengths=lengths, backend=backend)
    s64 = _truth(hidden, last, head.weight, head.bias)
    mu, sigma = head.norm_mean, head.norm_std
    ref64 = [s64, *reference.ensemble_reduce(s64, method, 0.5, 0, mu, sigma, torch.float64)]
    torch_d = reference.ensemble_head(hidden, last, head.weight, head.bias, method, 0.5, 0, mu.to(dtype),
                                      sigma.to(dtype), compute_dtype=dtype)
    for name, got, td, r in zip(("scores", "combined", "mean", "var"), (out.scores, out.combined, out.mean, out.var),
                                torch_d, ref64):
        assert_within_torch_error(got, td, r, dtype, f"{method} {name}")


def test_head_backward_gpu_matches_cpu():
    head = prefkern.EnsembleRewardHead(256, 5, method="uwo")
    hidden = torch.randn(64, 3, 256)
    mask = (torch.rand(64, 3) > 0.3).long()
    mask[:, 0] = 1
    x_cpu = hidden.clone().requires_grad_()
    head(x_cpu, mask).combined.sum().backward()
    g_cpu = head.weight.grad.clone()
    head_gpu = head.cuda()
    head_gpu.weight.grad = None
    x_gpu = hidden.cuda().requires_grad_()
    head_gpu(x_gpu, mask.cuda()).combined.sum().backward()
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_gpu.weight.grad.cpu(), g_cpu, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("k,n", [(1, 7), (5, 100_000), (16, 4097)])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_reduce_gpu(k, n, backend):
    s = torch.randn(k, n, device="cuda")
    for method in ("mean", "wco", "uwo"):
        for ddof in (0, 1) if k > 1 else (0,):
            out = prefkern.ensemble_reduce(s, method, lam=0.5, ddof=ddof, normalize=([0.5] * k, [2.0] * k),
                                           backend=backend)
            a = (s.double().cpu().numpy() - 0.5) / 2.0
            mean, var = a.mean(0), a.var(0, ddof=ddof)
            want = {"mean": mean, "wco": a.min(0), "uwo": mean - 0.5 * var}[method]
            np.testing.assert_allclose(out.combined.cpu().numpy(), want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out.var.cpu().numpy(), var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_head_strided_hidden_gpu(backend):
    """A [B, T, H] view with padded rows (no 16-byte packs on the CUDA path) and a 16-byte aligned one."""
    for h, pad in ((512, 3), (512, 8)):
        store = torch.randn(40, 3, h + pad, device="cuda", dtype=torch.bfloat16)
        hidden = store[:, :, :h]
        head = prefkern.EnsembleRewardHead(h, 6, device="cuda", dtype=torch.bfloat16)
        lengths = torch.randint(1, 4, (40,), device="cuda")
        out = head(hidden, lengths=lengths, backend=backend)
        want = head(hidden.contiguous(), lengths=lengths, backend="torch")
        torch.testing.assert_close(out.scores, want.scores, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend,kernel", [("triton", "_ensemble_head_forward_kernel"), ("cuda", "ensemble_head_kernel")])
def test_head_is_one_launch(backend, kernel):
    head = prefkern.EnsembleRewardHead(4096, 8, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(512, 2, 4096, device="cuda", dtype=torch.bfloat16)
    last = torch.ones(512, dtype=torch.long, device="cuda")
    weight = head.weight.detach()
    bias = head.bias.detach().float()
    prefkern.ops.ensemble.ensemble_head_fwd(hidden, last, weight, bias, None, None, 2, 0.5, 0, False, backend)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        prefkern.ops.ensemble.ensemble_head_fwd(hidden, last, weight, bias, None, None, 2, 0.5, 0, False, backend)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = [e.name for e in kernels if "Memset" not in e.name and "memcpy" not in e.name.lower()]
    assert len(launches) == 1 and kernel in launches[0], launches


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("method", ["mean", "wco", "uwo"])
def test_nan_member_makes_the_reduction_nan_gpu(backend, method):
    """fminf / tl.min drop NaN on the GPU: a NaN member must still make the reduced score NaN."""
    s = torch.randn(5, 300, device="cuda")
    s[2, 3] = s[0, 7] = s[4, 8] = float("nan")
    s[:, 9] = float("nan")
    out = prefkern.ensemble_reduce(s, method, check_finite=False, backend=backend)
    for t in out:
        assert bool(torch.isnan(t[[3, 7, 8, 9]]).all()), t[[3, 7, 8, 9]]
    rest = torch.ones(300, dtype=torch.bool)
    rest[[3, 7, 8, 9]] = False
    want = prefkern.ensemble_reduce(s[:, rest.cuda()], method, backend="torch")
    torch.testing.assert_close(out.combined[rest.cuda()], want.combined, atol=1e-5, rtol=1e-5)
    head = prefkern.EnsembleRewardHead(64, 4, method=method, check_finite=False, device="cuda")
    hidden = torch.randn(8, 3, 64, device="cuda")
    hidden[2, 2, 5] = float("nan")
    scored = head(hidden, backend=backend, group_size=4)
    assert bool(torch.isnan(scored.combined[0, 2])) and prefkern.best_of_n(scored.combined).local[0, 0] != 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_launches_run_on_the_tensors_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: the launch must use cuda:1 (its stream and context)."""
    with torch.cuda.device(0):
        s = torch.randn(4, 50, device="cuda:1")
        out = prefkern.ensemble_reduce(s, "uwo", backend=backend)
        want = prefkern.ensemble_reduce(s.cpu(), "uwo", backend="torch")
        torch.testing.assert_close(out.combined.cpu(), want.combined, atol=1e-5, rtol=1e-5)
        head = prefkern.EnsembleRewardHead(32, 3, device="cuda:1")
        hidden = torch.randn(5, 2, 32, device="cuda:1")
        torch.testing.assert_close(head(hidden, backend=backend).scores, head(hidden, backend="torch").scores,
                                   atol=1e-4, rtol=1e-4)
        tokens = prefkern.sample(torch.randn(3, 100, device="cuda:1"), seed=1, top_k=5, backend=backend)
        assert tokens.device == torch.device("cuda:1") and bool(((tokens >= 0) & (tokens < 100)).all())
