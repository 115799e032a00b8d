"""The fused-loss engine and the lm-head GEMM policy: what a CPU machine can prove of the GPU paths.

Fake CUDA tensors (``FakeTensorMode``) run the chunked paths' Python on a CPU-only torch: every GEMM they issue
is recorded with its operand dtypes. Autograd on fake CUDA tensors aborts, so the backward is traced by calling
its (no-grad) implementation directly.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import prefkern
from prefkern.compat.liger import LigerFusedLinearSimPOLoss
from prefkern.ops.linear_logprobs import chunked_backward, chunked_forward
from prefkern.ops.lm_head_gemm import LmHeadGemms, gemm_dtype

GEMMS = ("mm", "addmm", "bmm")


class RecordTensors(TorchDispatchMode):
    """Every GEMM's tensor operands and every tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.gemms, self.outputs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in GEMMS:
            self.gemms.append((func.__name__, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((func.__name__, tuple(t.shape), t.dtype))
        return out


def fake_cuda_inputs(n=12, h=16, v=50, dtype=torch.bfloat16):
    hidden = torch.randn(n, h, dtype=dtype, device="cuda")
    weight = torch.randn(v, h, dtype=dtype, device="cuda")
    labels = torch.randint(0, v, (n,), device="cuda")
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_chunked_forward_gemms_run_in_the_input_dtype(dtype):
    with FakeTensorMode():
        hidden, weight, labels = fake_cuda_inputs(dtype=dtype)
        with RecordTensors() as rec:
            logp, lse, _ = chunked_forward(hidden, weight, None, labels, -100, "triton", 5)
    assert logp.dtype == lse.dtype == torch.float32
    assert len(rec.gemms) == 3  # 12 rows in chunks of 5
    for name, dtypes in rec.gemms:
        assert dtypes == [dtype, dtype], (name, dtypes)
    v_by_h = tuple(weight.shape)
    assert not [o for o in rec.outputs if o[1] == v_by_h and o[2] == torch.float32], "an fp32 copy of the head"


def test_gpu_chunked_backward_gemms_run_in_the_input_dtype():
    with FakeTensorMode():
        hidden, weight, labels = fake_cuda_inputs()
        grad = torch.ones(hidden.shape[0], device="cuda")
        lse = torch.zeros(hidden.shape[0], 2, device="cuda")
        with RecordTensors() as rec:
            dx, dw, _ = chunked_backward(grad, hidden, weight, None, labels, lse, -100, "triton", 5, True, True, False)
    assert dx.dtype == dw.dtype == torch.float32
    # per chunk: logits, dX, dW (accumulated in fp32: the first operand of addmm is the fp32 accumulator)
    assert [name.split(".")[0] for name, _ in rec.gemms] == ["mm", "mm", "addmm"] * 3
    for name, dtypes in rec.gemms:
        operands = dtypes[1:] if name.startswith("addmm") else dtypes
        assert operands == [torch.bfloat16, torch.bfloat16], (name, dtypes)
    fp32_heads = [o for o in rec.outputs if o[1] == tuple(weight.shape) and o[2] == torch.float32]
    assert all(name.startswith(("zeros", "addmm")) for name, _, _ in fp32_heads), fp32_heads  # dW only


def test_linear_logprobs_no_grad_forward_traces_with_fake_cuda_tensors():
    with FakeTensorMode(), torch.no_grad():
        hidden, weight, labels = fake_cuda_inputs()
        logp = prefkern.linear_logprobs(hidden.view(3, 4, -1), weight, labels.view(3, 4))
    assert logp.shape == (3, 4) and logp.dtype == torch.float32 and logp.device.type == "cuda"


def test_gemm_policy_per_device():
    with FakeTensorMode():
        for dtype in (torch.bfloat16, torch.float16):
            assert gemm_dtype(torch.empty(4, 4, dtype=dtype, device="cuda")) == dtype
        assert gemm_dtype(torch.empty(4, 4, device="cuda")) == torch.float32
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert gemm_dtype(torch.empty(4, 4, dtype=dtype)) == torch.float32  # CPU: fp32 GEMMs measured fastest


def test_cpu_gemms_match_float64():
    """The CPU policy (fp32 GEMMs on bf16 inputs) against float64, per output: logits, dX, dW."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 33, generator=g).to(torch.bfloat16)
    w = torch.randn(45, 33, generator=g).to(torch.bfloat16)
    b = torch.randn(45, generator=g).to(torch.bfloat16)
    dz = torch.randn(7, 45, generator=g)
    head = LmHeadGemms(w, b)
    z = head.logits(x, torch.empty(7, 45))
    torch.testing.assert_close(z.double(), x.double() @ w.double().t() + b.double(), atol=1e-5, rtol=1e-5)
    op = head.grad_operand(dz)
    torch.testing.assert_close(head.grad_hidden(op).double(), dz.double() @ w.double(), atol=1e-5, rtol=1e-5)
    dw = head.accumulate_grad_weight(torch.zeros(45, 33), op, x)
    torch.testing.assert_close(dw.double(), dz.double().t() @ x.double(), atol=1e-5, rtol=1e-5)


def _pair_inputs(seed=0, b=3, t=9, h=12, v=40):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    labels[:, :2] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "orpo"])
def test_eager_losses_carry_the_stream_gradient(loss_type):
    """Per-pair losses built by the caller from ``out.losses`` train the same in eager and stream mode."""
    hidden, weight, labels = _pair_inputs()
    ref = torch.randn(hidden.shape[0]) - 20.0
    pair_weights = torch.tensor([0.3, 1.0, 2.0])
    grads = {}
    for mode in ("eager", "stream"):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        kw = {"ref_logps": ref} if loss_type == "sigmoid" else {}
        out = prefkern.FusedLinearPreferenceLoss(loss_type, mode=mode)(x, w, labels, **kw)
        assert out.losses.requires_grad, mode
        (out.losses * pair_weights).sum().backward()
        grads[mode] = (x.grad, w.grad)
    for a, e in zip(grads["eager"], grads["stream"]):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_eager_loss_and_losses_together():
    """``loss`` (gradients from forward) and ``losses`` (recomputed) in one backward: their gradients add."""
    hidden, weight, labels = _pair_inputs(seed=1)
    ref = torch.randn(hidden.shape[0]) - 20.0
    results = {}
    for mode in ("eager", "stream"):
        x = hidden.clone().requires_grad_()
        out = prefkern.FusedLinearPreferenceLoss("sigmoid", mode=mode)(x, weight, labels, ref_logps=ref)
        (out.loss + 0.5 * out.losses[0]).backward()
        results[mode] = x.grad
    torch.testing.assert_close(results["eager"], results["stream"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("offset", [0.0, 300.0, 1e4])
def test_torch_row_kernel_keeps_max_and_log_sum_apart(offset):
    """A confident token: log p = -log(1 + e^-16) = -1.125e-7 at any offset of the row, and the other token's
    -16, against float64 (fp32 rounding of the log-prob itself: relative 1e-6)."""
    logits = torch.tensor([[16.0 + offset, offset], [16.0 + offset, offset]])
    labels = torch.tensor([0, 1])
    truth = torch.log_softmax(logits.double(), -1).gather(1, labels[:, None])[:, 0]
    got = prefkern.logprobs(logits, labels, backend="torch")
    torch.testing.assert_close(got.double(), truth, atol=0, rtol=1e-6)


def test_mixed_precision_head_is_promoted_and_gradients_keep_their_dtypes():
    """bf16 hidden states with an fp32 head (a mixed-precision model): the head runs in fp32, dX comes back in
    bf16 and dW in fp32, equal to the all-fp32 computation on the same (bf16-rounded) hidden states."""
    hidden, weight, labels = _pair_inputs(seed=2)
    x16 = hidden.to(torch.bfloat16).requires_grad_()
    w = weight.clone().requires_grad_()
    out = prefkern.linear_logprobs(x16, w, labels)
    out.sum().backward()
    x32, w32 = x16.detach().float().requires_grad_(), weight.clone().requires_grad_()
    expect = prefkern.linear_logprobs(x32, w32, labels)
    expect.sum().backward()
    torch.testing.assert_close(out, expect)
    assert x16.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(x16.grad, x32.grad.to(torch.bfloat16))
    torch.testing.assert_close(w.grad, w32.grad)


@pytest.mark.parametrize("mode", ["eager", "stream"])
def test_autocast_runs_the_head_in_the_autocast_dtype(mode):
    """Under bf16 autocast the loss equals the one on bf16-cast operands (as F.linear under autocast)."""
    hidden, weight, labels = _pair_inputs(seed=3)
    ref = torch.randn(hidden.shape[0]) - 20.0
    module = prefkern.FusedLinearPreferenceLoss("sigmoid", mode=mode)
    x = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, weight, labels, ref_logps=ref)
    out.loss.backward()
    xb = hidden.to(torch.bfloat16).requires_grad_()
    expect = module(xb, weight.to(torch.bfloat16), labels, ref_logps=ref)
    expect.loss.backward()
    torch.testing.assert_close(out.loss, expect.loss)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, xb.grad.float())


@pytest.mark.parametrize("mode", ["eager", "stream"])
def test_weighted_list_of_loss_types(mode):
    """TRL's multi-loss (MPO-style) through the module, against the catalog on materialised log-probs."""
    hidden, weight, labels = _pair_inputs(seed=4)
    ref = torch.randn(hidden.shape[0]) - 20.0
    types, weights = ["sigmoid", "sft"], [1.0, 0.3]
    if mode == "stream":
        types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    x = hidden.clone().requires_grad_()
    out = prefkern.FusedLinearPreferenceLoss(types, mode=mode, loss_weights=weights)(x, weight, labels, ref_logps=ref)
    out.loss.backward()
    x2 = hidden.clone().requires_grad_()
    tok = prefkern.reference.linear_logprobs(x2.reshape(-1, x2.shape[-1]), weight, labels.reshape(-1)).view(labels.shape)
    b = labels.shape[0] // 2
    batch = prefkern.preference_batch(tok, labels != -100)
    batch.ref_chosen_logps, batch.ref_rejected_logps = ref[:b], ref[b:]
    expect = prefkern.preference_loss(types, batch=batch, loss_weights=weights)
    expect.loss.backward()
    torch.testing.assert_close(out.loss, expect.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-4)


def test_list_loss_type_rejects_other_families():
    with pytest.raises(ValueError, match="DPO-family"):
        prefkern.FusedLinearPreferenceLoss(["sigmoid", "simpo"])


TRANSFORMS = [dict(temperature=0.7), dict(logit_scale=0.0625), dict(logit_softcap=3.0),
              dict(temperature=1.3, logit_scale=2.0, logit_softcap=5.0)]


def _materialised_logps(x, w, b, y, temperature=1.0, logit_scale=1.0, logit_softcap=None):
    z = (x.double() @ w.double().t() + b.double()) * logit_scale
    if logit_softcap:
        z = torch.tanh(z / logit_softcap) * logit_softcap
    return torch.log_softmax(z / temperature, -1)


@pytest.mark.parametrize("opts", TRANSFORMS)
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_linear_logprobs_logit_transform_values_and_gradients(opts, backend):
    """Temperature, logit scale and soft-cap against float64 on materialised logits (fp32 tolerances)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(9, 12, generator=g) * 2).requires_grad_()
    w = torch.randn(31, 12, generator=g).requires_grad_()
    b = torch.randn(31, generator=g).requires_grad_()
    y = torch.randint(0, 31, (9,), generator=g)
    y[2] = -100
    out = prefkern.linear_logprobs(x, w, y, b, backend=backend, chunk_rows=4, **opts)
    out.sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    truth = _materialised_logps(*leaves, y.clamp(min=0), **opts).gather(1, y.clamp(min=0)[:, None])[:, 0]
    truth = truth.masked_fill(y == -100, 0.0)
    truth.sum().backward()
    torch.testing.assert_close(out.double(), truth.detach(), atol=2e-5, rtol=1e-5)
    for ours, exact in zip((x, w, b), leaves):
        torch.testing.assert_close(ours.grad.double(), exact.grad, atol=1e-4, rtol=1e-4)


def test_token_stats_against_float64():
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(10, 12, generator=g), torch.randn(29, 12, generator=g)
    b = torch.zeros(29)
    y = torch.randint(0, 29, (10,), generator=g)
    y[0] = -100
    y[3] = int((x[3] @ w.t()).argmax())  # one label that is the argmax
    for backend in ("native", "torch"):
        logp, stats = prefkern.linear_logprobs(x, w, y, backend=backend, temperature=0.8, return_stats=True,
                                               chunk_rows=3)
        logq = _materialised_logps(x, w, b, y, temperature=0.8)
        p = logq.exp()
        scored = y != -100
        expect = {
            "entropy": -(p * logq).sum(-1),
            "log_sum_p2": torch.log((p * p).sum(-1)),
            "logit_sum": (x.double() @ w.double().t() / 0.8).sum(-1),
            "top1": (logq.argmax(-1) == y).double(),
        }
        for name, value in expect.items():
            got = getattr(stats, name)
            assert got[0] == 0.0, (backend, name)
            torch.testing.assert_close(got[scored].double(), value[scored], atol=1e-4, rtol=1e-5, msg=name)
        assert stats.top1[3] == 1.0


@pytest.mark.parametrize("opts", TRANSFORMS[2:])
def test_loss_module_logit_transform_eager_matches_stream(opts):
    hidden, weight, labels = _pair_inputs(seed=7)
    ref = torch.randn(hidden.shape[0]) - 20.0
    results = {}
    for mode in ("eager", "stream"):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = prefkern.FusedLinearPreferenceLoss("sigmoid", mode=mode, **opts)(x, w, labels, ref_logps=ref)
        out.loss.backward()
        results[mode] = (out.loss, x.grad, w.grad)
    for a, e in zip(results["eager"], results["stream"]):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_logit_transform_arguments_are_checked():
    hidden, weight, labels = _pair_inputs()
    for kwargs, exc, name in [(dict(temperature=0.0), ValueError, "temperature"),
                              (dict(logit_softcap=-1.0), ValueError, "logit_softcap"),
                              (dict(logit_scale="2"), TypeError, "logit_scale"),
                              (dict(logit_scale=0.0), ValueError, "logit_scale")]:
        with pytest.raises(exc, match=name):
            prefkern.linear_logprobs(hidden, weight, labels, **kwargs)
        with pytest.raises(exc, match=name):
            prefkern.FusedLinearPreferenceLoss("simpo", **kwargs)


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "orpo"])
@pytest.mark.parametrize("mode", ["auto", "stream"])
def test_loss_module_compiles_fullgraph(loss_type, mode):
    """torch.compile(fullgraph=True) of the module: same loss and gradients as the uncompiled (eager) call."""
    torch._dynamo.reset()
    hidden, weight, labels = _pair_inputs(seed=8)
    kw = {"ref_logps": torch.randn(hidden.shape[0]) - 20.0} if loss_type == "sigmoid" else {}
    module = prefkern.FusedLinearPreferenceLoss(loss_type, mode=mode)
    compiled = torch.compile(module, fullgraph=True)
    x1, x2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    a = compiled(x1, weight, labels, **kw)
    b = module(x2, weight, labels, **kw)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)


def test_loss_module_return_stats_compiles_fullgraph():
    torch._dynamo.reset()
    hidden, weight, labels = _pair_inputs(seed=9)
    ref = torch.randn(hidden.shape[0]) - 20.0
    module = prefkern.FusedLinearPreferenceLoss("sigmoid", return_stats=True)
    a = torch.compile(module, fullgraph=True)(hidden.clone().requires_grad_(), weight, labels, ref_logps=ref)
    b = module(hidden.clone().requires_grad_(), weight, labels, ref_logps=ref)
    for name in ("entropy", "log_sum_p2", "logit_sum", "top1"):
        torch.testing.assert_close(getattr(a.token_stats, name), getattr(b.token_stats, name), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value", [2 ** 70, -(2 ** 64)])
def test_absurd_ignore_index_is_named(value):
    hidden, weight, labels = _pair_inputs()
    with pytest.raises(ValueError, match="ignore_index"):
        prefkern.linear_logprobs(hidden, weight, labels, ignore_index=value)
    with pytest.raises(ValueError, match="ignore_index"):
        prefkern.logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2]), ignore_index=value)
    with pytest.raises(ValueError, match="ignore_index"):
        prefkern.FusedLinearPreferenceLoss("simpo", ignore_index=value)
    with pytest.raises(ValueError, match="ignore_index"):
        LigerFusedLinearSimPOLoss(ignore_index=value)


@pytest.mark.parametrize("backend", ["native", "triton", "torch"])
def test_nan_at_an_ignored_position_reaches_no_value_or_gradient(backend):
    """DESIGN.md: masked positions contribute exactly zero. A NaN logit / hidden state at an ignored position
    leaves every value and gradient equal to the run without it (logprobs and linear_logprobs, every backend)."""
    from prefkern.dispatch import backend_status

    if not backend_status(backend, torch.device("cpu"))[0]:
        pytest.skip(f"{backend} not available")
    labels = torch.tensor([0, -100, 3, -100])
    results = []
    for poison in (False, True):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
        h = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
        w = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
        if poison:
            x[1, 2] = float("nan")
            h[3, 0] = float("nan")
        x.requires_grad_()
        h.requires_grad_()
        w.requires_grad_()
        a = prefkern.logprobs(x, labels, backend=backend)
        b = prefkern.linear_logprobs(h, w, labels, backend=backend)
        (a.sum() + b.sum()).backward()
        results.append([a.detach(), b.detach(), x.grad, h.grad, w.grad])
    for clean, poisoned in zip(*results):
        assert torch.isfinite(poisoned).all()
        torch.testing.assert_close(poisoned, clean)


def test_nan_at_an_ignored_position_under_tracing_paths(monkeypatch):
    """When rows cannot be selected (tracing, graph capture) every row goes through the chunks: an ignored row's
    NaN hidden state still reaches neither dX nor dW."""
    labels = torch.tensor([0, -100, 3])
    h = torch.randn(3, 5)
    w = torch.randn(6, 5)
    h_nan = h.clone()
    h_nan[1, 0] = float("nan")
    _, lse, _ = chunked_forward(h, w, None, labels, -100, "native", 2)
    grad = torch.ones(3)
    import prefkern.ops.linear_logprobs as ll

    clean = chunked_backward(grad, h, w, None, labels, lse, -100, "native", 2, True, True, False)
    monkeypatch.setattr(ll, "scored_rows", lambda labels, ignore_index: None)  # as when values cannot be read
    poisoned = chunked_backward(grad, h_nan, w, None, labels, lse, -100, "native", 2, True, True, False)
    for a, b in zip(clean[:2], poisoned[:2]):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b)


def _float64_stats(x, w, y, **opts):
    logq = _materialised_logps(x.reshape(-1, x.shape[-1]), w, torch.zeros(w.shape[0]), y.reshape(-1), **opts)
    p = logq.exp()
    lead = y.shape
    return {"entropy": (-(p * logq).sum(-1)).reshape(lead), "log_sum_p2": torch.log((p * p).sum(-1)).reshape(lead),
            "top1": (logq.argmax(-1) == y.reshape(-1)).double().reshape(lead)}


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("mode", ["eager", "stream"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "kto", "salt"])
def test_loss_module_return_stats_against_float64(mode, loss_type, backend):
    """``return_stats=True``: per-token statistics from the loss's own pass, equal to float64 on scored positions,
    0 elsewhere; loss and gradients exactly those of ``return_stats=False``."""
    if loss_type == "salt" and mode == "eager":
        pytest.skip("SALT is token-level: it always streams")
    hidden, weight, labels = _pair_inputs(seed=11)
    opts = {"temperature": 0.7, "logit_softcap": 4.0}
    n = hidden.shape[0]
    kw = {"sigmoid": {"ref_logps": torch.randn(n) - 20.0},
          "kto": {"ref_logps": torch.randn(n) - 20.0, "desirable": torch.arange(n) % 2 == 0},
          "salt": {"token_weights": torch.rand(labels.shape)}}[loss_type]
    results = {}
    for stats in (False, True):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        module_mode = "stream" if loss_type == "salt" else mode
        extra = {"kl": 0.0} if loss_type == "kto" else {}
        out = prefkern.FusedLinearPreferenceLoss(loss_type, mode=module_mode, return_stats=stats, backend=backend,
                                                 **opts, **extra)(x, w, labels, **kw)
        out.loss.backward()
        results[stats] = (out.loss.detach(), x.grad, w.grad)
        assert (out.token_stats is not None) == stats
    for a, e in zip(results[True], results[False]):
        assert torch.equal(a, e)
    scored = labels != -100
    expect = _float64_stats(hidden, weight, labels, **opts)
    for name in ("entropy", "log_sum_p2", "top1"):
        got = getattr(out.token_stats, name)
        assert got.shape == labels.shape and not got.requires_grad
        assert torch.all(got[~scored] == 0), name
        # fp32 logits against float64: a few ulps of values of order 1-10
        torch.testing.assert_close(got[scored].double(), expect[name][scored], atol=2e-5, rtol=1e-5, msg=name)


class CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0].rstrip("_") in GEMMS  # mm.out, addmm_ (CPU dW) count too
        return func(*args, **(kwargs or {}))


def test_eager_return_stats_adds_no_gemm():
    hidden, weight, labels = _pair_inputs(seed=12)
    ref = torch.randn(hidden.shape[0]) - 20.0
    counts = {}
    for stats in (False, True):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with CountGemms() as rec:
            out = prefkern.FusedLinearPreferenceLoss("sigmoid", mode="eager", return_stats=stats)(x, w, labels,
                                                                                                   ref_logps=ref)
            out.loss.backward()
        counts[stats] = rec.count
    assert counts[True] == counts[False] == 3  # logits, dX, dW: one chunk


def test_row_stats_slices_match_one_slice(monkeypatch):
    import prefkern.ops.linear_logprobs as LLP

    g = torch.Generator().manual_seed(13)
    z = torch.randn(9, 23, generator=g) * 3
    y = torch.randint(0, 23, (9,), generator=g)
    y[4] = -100
    lse = torch.stack([z.max(-1).values, torch.logsumexp(z - z.max(-1, keepdim=True).values, -1)], -1)
    whole = LLP.row_stats(z, lse, y, 1.0, -100)
    monkeypatch.setattr(LLP, "STATS_SLICE_BYTES", 2 * 4 * 23)  # two rows per slice, a short last slice
    assert torch.equal(LLP.row_stats(z, lse, y, 1.0, -100), whole)
    assert torch.all(whole[4] == 0)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("v", [37, 2048 + 5])
def test_row_stats_kernels_against_torch_ops(v, backend):
    """The one-read kernels (C++, Triton) against the torch-ops path: odd V, a second block, ignored rows, -inf
    logits (a masked vocabulary), ties for the argmax (the first wins, as in torch.argmax), a NaN row (NaN
    values; the NaN is the argmax, as in torch.argmax)."""
    import prefkern.ops.linear_logprobs as LLP

    g = torch.Generator().manual_seed(14)
    z = torch.randn(7, v, generator=g) * 4
    z[1, : v // 2] = float("-inf")
    z[2, 3] = z[2, v - 1] = z[2].max() + 1.0  # a tie at the top: index 3 is the argmax
    z[5, 7] = float("nan")
    y = torch.randint(0, v, (7,), generator=g)
    y[2], y[4], y[5] = 3, -100, 7
    scaled = z * 0.8
    m = scaled.max(-1).values
    lse = torch.stack([m, torch.log(torch.exp(scaled - m[:, None]).sum(-1))], -1)
    expect = LLP.row_stats(z, lse, y, 0.8, -100, backend="torch")
    assert LLP._row_stats_route(backend, z) == backend
    # the same rows in a wider buffer, one column in: another row stride and a base 4 bytes off alignment
    wide = torch.full((7, v + 3), 123.0)
    wide[:, 1:v + 1] = z
    for rows in (z, wide[:, 1:v + 1]):
        got = LLP.row_stats(rows, lse, y, 0.8, -100, backend=backend)
        assert torch.all(got[4] == 0) and got[2, 3] == 1.0 and got[5, 3] == 1.0
        assert torch.isnan(got[5, :2]).all() and not torch.isnan(got[[0, 1, 2, 3, 6], :3]).any()
        torch.testing.assert_close(got[:, :2], expect[:, :2], atol=1e-5, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(got[:, 2], expect[:, 2], atol=1e-3, rtol=1e-5, equal_nan=True)  # sums of ~v terms
        assert torch.equal(got[:, 3], expect[:, 3])


def test_return_stats_option_checks():
    with pytest.raises(ValueError, match="return_stats"):
        prefkern.FusedLinearPreferenceLoss("sigmoid", return_stats=True, deterministic=False)
    with pytest.raises(ValueError, match="return_stats"):
        prefkern.FusedLinearPreferenceLoss("sigmoid", return_stats=True, vocab_parallel=True)
    with pytest.raises(TypeError, match="return_stats"):
        prefkern.FusedLinearPreferenceLoss("sigmoid", return_stats="yes")
