"""The fused engine on a real GPU: tensor-core GEMM dtypes, values against float64, launches on the tensor's device.

Marked ``gpu``: skipped without CUDA, run by ``benchmarks/gpu_check.sh`` on a lent GPU host.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prefkern

pytestmark = pytest.mark.gpu


class RecordGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.gemms = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("mm", "addmm", "bmm"):
            self.gemms.append((func.__name__, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def pair_batch(device, dtype, b=4, t=64, h=256, v=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * b, t, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) * 0.05).to(device, dtype)
    labels = torch.randint(0, v, (2 * b, t), generator=g).to(device)
    labels[:, :8] = -100
    ref = (torch.randn(2 * b, generator=g) - 50.0).to(device)
    return hidden, weight, labels, ref


def reference_loss(hidden, weight, labels, ref):
    """float64 DPO on materialised logits."""
    x, w = hidden.double(), weight.double()
    tok = prefkern.reference.linear_logprobs(x.reshape(-1, x.shape[-1]), w, labels.reshape(-1), None,
                                             compute_dtype=torch.float64).view(labels.shape)
    batch = prefkern.preference_batch(tok, labels != -100)
    b = labels.shape[0] // 2
    batch.ref_chosen_logps, batch.ref_rejected_logps = ref[:b].double(), ref[b:].double()
    return prefkern.preference_loss("sigmoid", batch=batch)


@pytest.mark.parametrize("mode", ["eager", "stream"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_lm_head_gemm_runs_on_tensor_cores(mode, dtype):
    hidden, weight, labels, ref = pair_batch("cuda", dtype)
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with RecordGemms() as rec:
        out = prefkern.FusedLinearPreferenceLoss("sigmoid", mode=mode)(x, w, labels, ref_logps=ref)
        out.loss.backward()
    assert rec.gemms, "no GEMM recorded"
    for name, dtypes in rec.gemms:
        operands = dtypes[1:] if name.startswith("addmm") else dtypes
        assert operands == [dtype, dtype], (name, dtypes)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


@pytest.mark.parametrize("mode", ["eager", "stream"])
def test_bf16_loss_and_gradients_against_float64(mode):
    hidden, weight, labels, ref = pair_batch("cuda", torch.bfloat16, seed=1)
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = prefkern.FusedLinearPreferenceLoss("sigmoid", mode=mode)(x, w, labels, ref_logps=ref)
    out.loss.backward()
    x64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expect = reference_loss(x64, w64, labels, ref)
    expect.loss.backward()
    # plain torch in bf16 against the same float64 truth sets the tolerance (DESIGN.md section 9)
    xb, wb = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tok = torch.log_softmax(xb @ wb.t(), -1).float().gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    plain = prefkern.preference_loss("sigmoid", batch=prefkern.preference_batch(tok * (labels != -100),
                                                                                 labels != -100),
                                     ref_chosen_logps=ref[:4], ref_rejected_logps=ref[4:])
    plain.loss.backward()
    tol = 2 * (plain.loss.double() - expect.loss).abs().item() + 1e-3
    assert (out.loss.double() - expect.loss).abs().item() <= tol
    gtol = 2 * (xb.grad.double() - x64.grad).abs().max().item() + 1e-3
    assert (x.grad.double() - x64.grad).abs().max().item() <= gtol


def test_linear_logprobs_launches_on_the_tensors_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    hidden, weight, labels, _ = pair_batch("cuda:1", torch.bfloat16, b=1, t=16, h=64, v=300)
    with torch.cuda.device(0):
        x = hidden.clone().requires_grad_()
        out = prefkern.linear_logprobs(x, weight, labels)
        out.sum().backward()
    expect = prefkern.reference.linear_logprobs(hidden.double().reshape(-1, 64), weight.double(),
                                                labels.reshape(-1), None, compute_dtype=torch.float64)
    torch.testing.assert_close(out.reshape(-1).double(), expect, atol=5e-2, rtol=2e-2)
    assert x.grad.device == torch.device("cuda:1")


@pytest.mark.parametrize("opts", [dict(temperature=0.7), dict(logit_softcap=30.0, logit_scale=0.5)])
def test_logit_transform_on_the_gpu(opts):
    hidden, weight, labels, _ = pair_batch("cuda", torch.float32, b=2, t=16, h=64, v=300, seed=2)
    out = prefkern.linear_logprobs(hidden, weight, labels, **opts)
    expect = prefkern.linear_logprobs(hidden.cpu(), weight.cpu(), labels.cpu(), backend="torch", **opts)
    torch.testing.assert_close(out.cpu(), expect, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["eager", "stream"])
@pytest.mark.parametrize("v", [1000, 1001])
def test_return_stats_on_the_gpu(mode, v):
    """Row statistics from the one-read Triton kernel (odd V: peeled rows) against float64 on the same logits."""
    hidden, weight, labels, ref = pair_batch("cuda", torch.bfloat16, v=v)
    out = prefkern.FusedLinearPreferenceLoss("sigmoid", mode=mode, return_stats=True)(
        hidden.requires_grad_(), weight.requires_grad_(), labels, ref_logps=ref)
    out.loss.backward()
    x, w = hidden.detach().double().reshape(-1, hidden.shape[-1]), weight.detach().double()
    logq = torch.log_softmax(x @ w.t(), -1)
    p = logq.exp()
    scored = (labels != -100).reshape(-1)
    expect = {"entropy": -(p * logq).sum(-1), "log_sum_p2": torch.log((p * p).sum(-1))}
    for name, value in expect.items():
        got = getattr(out.token_stats, name).reshape(-1)
        assert torch.all(got[~scored] == 0)
        # the GEMM runs in bf16 with fp32 accumulation: the statistics carry the logits' fp32 rounding
        torch.testing.assert_close(got[scored].double(), value[scored], atol=1e-3, rtol=1e-3, msg=name)
