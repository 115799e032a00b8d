"""prefkern.logprobs on every backend this machine can run, against float64 truth."""

import math
import subprocess
import sys

import pytest
import torch

import prefkern
from prefkern import reference
from prefkern.dispatch import backend_status
from tolerance import assert_within_torch_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU = torch.device("cpu")


def cpu_backends():
    return [b for b in ("native", "triton") if backend_status(b, CPU)[0]]


def truth(logits, labels, temperature=1.0):
    """Float64 log-probs written independently of the reference: z_y - (max + log sum exp(z - max))."""
    z = logits.double() / temperature
    m = z.max(dim=-1, keepdim=True).values
    lse = (m + (z - m).exp().sum(-1, keepdim=True).log()).squeeze(-1)
    valid = labels != -100
    zy = z.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, zy - lse, torch.zeros_like(lse))


def make(n, v, dtype, ignore_every=0, scale=3.0):
    logits = (torch.randn(n, v) * scale).to(dtype)
    labels = torch.randint(0, v, (n,))
    if ignore_every:
        labels[::ignore_every] = -100
    return logits, labels


def grads_of(fn, logits, labels, g):
    x = logits.detach().clone().requires_grad_()
    fn(x, labels).backward(g)
    return x.grad


def test_reference_matches_float64_truth():
    logits, labels = make(33, 257, torch.float32, ignore_every=5)
    torch.testing.assert_close(reference.logprobs(logits, labels, compute_dtype=torch.float64), truth(logits, labels))


def test_gradcheck_float64():
    logits = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 10, 5, 5])
    assert torch.autograd.gradcheck(lambda x: prefkern.logprobs(x, labels, temperature=0.7), (logits,))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", [(1, 1), (7, 123), (16, 2048), (5, 5003)])
def test_forward_backward_vs_truth(backend, dtype, n, v):
    if backend == "triton" and v > 2100 and dtype != torch.float32:
        pytest.skip("interpreter time: half-precision Triton covered at smaller V")
    logits, labels = make(n, v, dtype, ignore_every=4)
    temperature = 0.8
    ours = prefkern.logprobs(logits, labels, temperature=temperature, backend=backend)
    ref64 = truth(logits, labels, temperature)
    torch_d = reference.logprobs(logits, labels, temperature=temperature, compute_dtype=dtype)
    assert ours.dtype == torch.float32
    assert_within_torch_error(ours, torch_d, ref64, dtype, "logp")

    g = torch.randn(n)
    grad = grads_of(lambda x, y: prefkern.logprobs(x, y, temperature=temperature, backend=backend), logits, labels, g)
    grad64 = grads_of(lambda x, y: truth(x, y, temperature), logits.double(), labels, g.double())
    grad_d = grads_of(lambda x, y: reference.logprobs(x, y, temperature=temperature, compute_dtype=dtype), logits, labels, g.to(dtype))
    assert grad.dtype == dtype
    assert_within_torch_error(grad, grad_d, grad64, dtype, "grad")
    assert torch.all(grad[labels == -100] == 0)


@pytest.mark.parametrize("backend", cpu_backends() + ["torch"])
def test_strided_rows_and_transposed_input(backend):
    base = torch.randn(12, 300)
    labels = torch.randint(0, 100, (6,))
    rows = base[::2, 50:150]  # row stride 600, unit column stride: used in place
    cols = torch.randn(100, 6).t()  # column stride 6: copied once
    for x in (rows, cols):
        assert not x.is_contiguous()
        torch.testing.assert_close(prefkern.logprobs(x, labels, backend=backend), truth(x, labels).float(), atol=1e-5, rtol=1e-5)
        xg = x.clone().requires_grad_()
        prefkern.logprobs(xg, labels, backend=backend).sum().backward()
        expect = grads_of(lambda a, y: truth(a, y), x.double(), labels, torch.ones(6, dtype=torch.float64))
        torch.testing.assert_close(xg.grad, expect.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends() + ["torch"])
def test_empty_and_fully_ignored(backend):
    empty = prefkern.logprobs(torch.randn(0, 50), torch.zeros(0, dtype=torch.long), backend=backend)
    assert empty.shape == (0,)
    x = torch.randn(4, 50, requires_grad=True)
    labels = torch.full((4,), -100)
    out = prefkern.logprobs(x, labels, backend=backend)
    assert torch.equal(out, torch.zeros(4))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(4, 50))


@pytest.mark.parametrize("backend", cpu_backends())
def test_custom_ignore_index_and_int32_labels(backend):
    logits, labels = make(9, 64, torch.float32)
    labels[3] = 7777
    out = prefkern.logprobs(logits, labels.to(torch.int32), ignore_index=7777, backend=backend)
    assert out[3] == 0
    expect = truth(logits, labels.masked_fill(labels == 7777, -100)).float()
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    x, y = torch.randn(3, 10), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*labels\[1\] = 10"):
        prefkern.logprobs(x, torch.tensor([1, 10, 2]))
    with pytest.raises(ValueError, match="labels must lie"):
        prefkern.logprobs(x, torch.tensor([1, -5, 2]))
    with pytest.raises(TypeError, match="labels must be an int64 or int32"):
        prefkern.logprobs(x, y.float())
    with pytest.raises(TypeError, match="logits must have dtype"):
        prefkern.logprobs(x.to(torch.int32), y)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        prefkern.logprobs(x.numpy(), y)
    with pytest.raises(ValueError, match=r"logits must have shape \[N, V\]"):
        prefkern.logprobs(x[None], y)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] = \[3\]"):
        prefkern.logprobs(x, y[:2])
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        prefkern.logprobs(x, y, temperature=0.0)
    with pytest.raises(ValueError, match="labels is on meta"):
        prefkern.logprobs(x, y.to("meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        prefkern.logprobs(x, y, backend="fast")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
        prefkern.logprobs(x, y, backend="cuda")
    with pytest.raises(TypeError, match="float64 logits run on the 'torch' backend only"):
        prefkern.logprobs(x.double(), y, backend="native")


def test_torch_compile_fullgraph():
    logits, labels = make(8, 97, torch.float32, ignore_every=3)

    def loss(x):
        return -(prefkern.logprobs(x, labels) * 2.0).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    out_c, out_e = compiled(x1), loss(x2)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(x1.grad, x2.grad)


def _free_memory_gib():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


@pytest.mark.slow
@pytest.mark.skipif(_free_memory_gib() < 12, reason="needs ~9 GiB free for two bf16 [2, 2^30+1000] tensors")
def test_more_than_2_pow_31_elements_native():
    """64-bit offsets: the label of row 1 sits past element 2^31 of the buffer."""
    n, v = 2, 2**30 + 1000
    assert n * v > 2**31
    logits = torch.zeros(n, v, dtype=torch.bfloat16)
    a = 3.0
    logits[1, v - 1] = a
    labels = torch.tensor([0, v - 1])
    x = logits.requires_grad_()
    out = prefkern.logprobs(x, labels, backend="native")
    expect1 = a - math.log(v - 1 + math.exp(a))
    expect0 = -math.log(v)
    assert abs(out[1].item() - expect1) < 1e-4 * abs(expect1) + 1e-4
    assert abs(out[0].item() - expect0) < 1e-4 * abs(expect0)
    out.backward(torch.tensor([0.0, 1.0]))
    g = x.grad
    assert g[0].abs().max().item() == 0
    assert abs(g[1, v - 1].item() - (1 - math.exp(expect1))) < 1e-3
    assert abs(g[1, 5].item() + math.exp(-math.log(v - 1 + math.exp(a)))) < 1e-9


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "prefkern", "info"], capture_output=True, text=True, check=True).stdout
    assert "[cpu]" in out and "native" in out and "torch" in out
    report = prefkern.info()
    assert report["cpu"]["torch"].startswith("yes")


@pytest.mark.parametrize("backend", cpu_backends() + ["torch"])
def test_masked_vocabulary_entries(backend):
    """-inf logits (masked special tokens), first in the row included, give exact zeros, never NaN."""
    logits, labels = make(6, 300, torch.float32)
    logits[:, :5] = -float("inf")
    logits[:, 200:210] = -float("inf")
    labels = labels.clamp(min=5, max=199)
    x = logits.clone().requires_grad_()
    out = prefkern.logprobs(x, labels, backend=backend)
    torch.testing.assert_close(out, truth(logits, labels).float(), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[:, :5] == 0)


def test_kernels_write_nan_for_out_of_range_labels():
    """The range check is skipped under CUDA graph capture (it would sync): the kernels themselves must
    then give NaN for a label outside [0, V), never read out of bounds, and leave the other rows exact."""
    from prefkern.ops._backends import dtype_code, native_module

    logits, labels = make(6, 50, torch.float32)
    labels[1], labels[3], labels[4] = 50, -7, -100
    want = truth(logits, labels.where((labels >= 0) & (labels < 50), torch.zeros_like(labels)))
    outs = {}
    if backend_status("native", CPU)[0]:
        logp, lse = torch.empty(6), torch.empty(6, 2)
        native_module().logprobs_forward_cpu(logits.data_ptr(), dtype_code(logits), 6, 50, 50, labels.data_ptr(),
                                             -100, 1.0, logp.data_ptr(), lse.data_ptr())
        outs["native"] = logp
    if backend_status("triton", CPU)[0]:
        from prefkern.kernels import linear_logprobs as linear_kernels
        from prefkern.kernels import logprobs as row_kernels

        outs["triton"] = row_kernels.logprobs_forward(logits, labels, -100, 1.0)[0]
        eye = torch.eye(50)  # hidden = logits, weight = I: the tile forward scores the same logits
        outs["triton-linear"] = linear_kernels.linear_lse_forward(logits, eye, None, labels, -100)[0]
    assert outs, "no kernel backend to test"
    for name, logp in outs.items():
        assert torch.isnan(logp[1]) and torch.isnan(logp[3]), name
        assert logp[4] == 0, name
        keep = [0, 2, 5]
        torch.testing.assert_close(logp[keep].double(), want[keep], atol=1e-5, rtol=1e-5, msg=name)


def _triton_or_skip():
    if "triton" not in cpu_backends():
        pytest.skip("triton cannot run here")
    from prefkern.kernels import logprobs as row_kernels

    return row_kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,pad,shift", [(37, 0, 0), (37, 3, 1), (50257, 0, 0), (50257, 5, 3), (4099, 7, 0)])
def test_triton_peeled_rows_odd_vocab_and_strides(dtype, v, pad, shift):
    """Rows starting anywhere within a 16-byte group (odd V, row strides that are not multiples of 8, a view
    starting ``shift`` elements in): head, aligned body and tail together give what the truth gives."""
    row_kernels = _triton_or_skip()
    n = 3 if v > 5000 else 6
    base = (torch.randn(n, v + pad + shift) * 3).to(dtype)
    logits = base[:, shift:shift + v]
    labels = torch.randint(0, v, (n,))
    labels[1] = 0  # the head
    labels[2] = v - 1  # the tail
    if n > 3:
        labels[4] = -100
    logp, lse = row_kernels.logprobs_forward(logits, labels, -100, 0.9)
    ref64 = truth(logits, labels, 1 / 0.9)
    torch_d = reference.logprobs(logits, labels, temperature=1 / 0.9, compute_dtype=dtype)
    assert_within_torch_error(logp, torch_d, ref64, dtype, "logp")
    g = torch.randn(n)
    grad64 = grads_of(lambda x, y: truth(x, y, 1 / 0.9), logits.double(), labels, g.double())
    grad_d = grads_of(lambda x, y: reference.logprobs(x, y, temperature=1 / 0.9, compute_dtype=dtype), logits, labels,
                      g.to(dtype))
    new = row_kernels.logprobs_backward(g, logits, labels, lse, -100, 0.9)
    other = torch.full((n, v + 11), 7.0, dtype=dtype)  # another row stride: stores not at the logits' offsets
    row_kernels.logprobs_backward(g, logits, labels, lse, -100, 0.9, out=other[:, 2:2 + v])
    inplace = base.clone()
    row_kernels.logprobs_backward(g, inplace[:, shift:shift + v], labels, lse, -100, 0.9,
                                  out=inplace[:, shift:shift + v])
    for name, grad in (("new", new), ("other stride", other[:, 2:2 + v]), ("in place", inplace[:, shift:shift + v])):
        assert_within_torch_error(grad, grad_d, grad64, dtype, f"grad ({name})")
    assert torch.equal(new, other[:, 2:2 + v]) and torch.equal(new, inplace[:, shift:shift + v])
    # nothing outside the rows is written
    assert bool((other[:, :2] == 7).all()) and bool((other[:, 2 + v:] == 7).all())
    assert torch.equal(inplace[:, :shift], base[:, :shift]) and torch.equal(inplace[:, shift + v:], base[:, shift + v:])
