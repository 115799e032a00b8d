"""Vocab-parallel lm-head on real gloo process groups (127.0.0.1), against the unsplit head in one process.

Each spawn runs every case of one world size once (a module fixture) and the tests below read its results: the
start-up of torch in the processes is the cost, not the cases. Shapes are tiny and V is not divisible by the world
size (37 = 19 + 18 on 2 ranks, 13 + 13 + 11 on 3; V = 2 on 3 ranks leaves the last slice empty).
"""

from __future__ import annotations

import pytest
import torch

import prefkern
from prefkern.distributed import VocabParallel, vocab_parallel_fused_loss, vocab_parallel_linear_logprobs
from prefkern.distributed.launch import spawn
from prefkern.fused import CatalogObjective, CatalogUnpairedObjective, EngineOptions, fused_loss
from prefkern.fused.engine import FusedResult

from tolerance import assert_within_torch_error

IGNORE = -100
H, T, PAIRS = 16, 6, 2
TIMEOUT = 90.0
DTYPES = (torch.float32, torch.bfloat16)


def bounds(v: int, world: int, rank: int):
    per = -(-v // world)
    return min(v, rank * per), min(v, (rank + 1) * per)


def make_case(v: int, world: int, dtype: torch.dtype, seed: int = 0):
    """Hidden [2B, T, H], head [V, H], bias [V], labels [2B, T] with ignored prompt tokens, a label in every slice,
    the upstream gradient [2B, T] and reference sequence log-probs."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(2 * PAIRS, T, H, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(v, H, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(v, generator=g) * 0.1).to(dtype)
    labels = torch.randint(0, v, (2 * PAIRS, T), generator=g)
    labels[:, :2] = IGNORE  # prompt
    labels[1, -1] = IGNORE  # padding
    for r in range(world):  # a label owned by each rank (where the rank owns rows)
        s, e = bounds(v, world, r)
        if e > s:
            labels[r % (2 * PAIRS), 2 + r % (T - 2)] = s + (e - s - 1) // 2
    upstream = torch.randn(2 * PAIRS, T, generator=g)
    ref = torch.randn(2 * PAIRS, generator=g) - 5
    return hidden, weight, bias, labels, upstream, ref


def dpo_objective(labels, ref):
    return CatalogObjective("sigmoid", {"beta": 0.5}, labels != IGNORE, ref_seq=(ref[:PAIRS], ref[PAIRS:]))


def kto_objective(labels, ref):
    desirable = torch.tensor([True, False, True, False][: labels.shape[0]])
    kl = {"kl_policy_logps": torch.linspace(-6.0, -4.0, 4).to(ref.dtype), "kl_ref_logps": torch.full((4,), -5.0, dtype=ref.dtype)}
    return CatalogUnpairedObjective("kto", {"beta": 0.3}, labels != IGNORE, ref, desirable, kl)


def run_linear(hidden, weight, bias, labels, upstream, options):
    """logp and gradients of ``(logp * upstream).sum()``."""
    x = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    if options is None:
        logp = prefkern.linear_logprobs(x, w, labels, b, ignore_index=IGNORE)
    else:
        logp = vocab_parallel_linear_logprobs(x, w, labels, b, options, IGNORE, chunk_rows=5)
    (logp * upstream).sum().backward()
    return {"logp": logp.detach(), "dx": x.grad, "dw": w.grad, "db": b.grad}


def run_fused(hidden, weight, bias, labels, ref, mode, options, unpaired=False, backend="auto"):
    x = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    objective = (kto_objective if unpaired else dpo_objective)(labels, ref)
    engine = EngineOptions(ignore_index=IGNORE, mode=mode, backend=backend,
                           memory_budget=1 << 20 if mode == "eager" else None)
    if options is None:
        res: FusedResult = fused_loss(x, w, b, labels, objective, engine)
    else:
        res = vocab_parallel_fused_loss(x, w, b, labels, objective, engine, options)
    # the loss plus a term through the per-pair losses: the token log-probs' own backward runs too
    (res.output.loss + 0.25 * res.output.losses.sum()).backward()
    return {"loss": res.output.loss.detach(), "tok": res.token_logps.detach(), "eager": res.eager, "dx": x.grad,
            "dw": w.grad, "db": b.grad}


# ---- the workers ---------------------------------------------------------------------------------------------


def vp_worker(rank: int, world: int, vocab_sizes, with_errors: bool = False):
    out = {"errors": errors_worker(rank, world)} if with_errors else {}
    for v in vocab_sizes:
        start, stop = bounds(v, world, rank)
        options = VocabParallel(None, start, stop)
        for dtype in DTYPES:
            hidden, weight, bias, labels, upstream, ref = make_case(v, world, dtype)
            ws, bs = weight[start:stop], bias[start:stop]
            key = (v, str(dtype))
            out[key + ("linear",)] = run_linear(hidden, ws, bs, labels, upstream, options)
            for mode in ("stream", "eager"):
                out[key + (mode,)] = run_fused(hidden, ws, bs, labels, ref, mode, options)
                out[key + (mode, "kto")] = run_fused(hidden, ws, bs, labels, ref, mode, options, unpaired=True)
            with torch.no_grad():
                out[key + ("no_grad",)] = vocab_parallel_linear_logprobs(hidden, ws, labels, bs, options, IGNORE)
    out["slices"] = {v: bounds(v, world, rank) for v in vocab_sizes}
    return out


def errors_worker(rank: int, world: int):
    """Errors that every rank must raise alike (no rank left waiting in a collective)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    v = 37
    hidden, weight, bias, labels, upstream, _ = make_case(v, world, torch.float32)
    start, stop = bounds(v, world, rank)
    got = {}
    bad = labels.clone()
    bad[0, 3] = v  # out of range: owned by no rank
    try:
        vocab_parallel_linear_logprobs(hidden, weight[start:stop], bad, None, VocabParallel(None, start, stop))
    except ValueError as e:
        got["out_of_range"] = str(e)
    overlap = VocabParallel(None, 0, stop)  # rank r > 0 claims rows of rank 0 too: labels owned twice
    try:
        vocab_parallel_linear_logprobs(hidden, weight[:stop], labels, None, overlap)
    except ValueError as e:
        got["overlap"] = str(e)
    try:
        wrong = torch.cat([weight[start:stop], weight[:1]])  # one row too many on every rank
        vocab_parallel_linear_logprobs(hidden, wrong, labels, None, VocabParallel(None, start, stop))
    except ValueError as e:
        got["shape"] = str(e)
    # a Shard(0) DTensor head: recognised with options=True, refused without
    mesh = init_device_mesh("cpu", (world,))
    dw = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    db = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
    x = hidden.clone().requires_grad_()
    logp = vocab_parallel_linear_logprobs(x, dw, labels, db, True, IGNORE)
    (logp * upstream).sum().backward()
    got["dtensor"] = {"logp": logp.detach(), "dx": x.grad, "dw": dw.grad.full_tensor(), "db": db.grad.full_tensor(),
                      "grad_placements": str(dw.grad.placements)}
    try:
        from prefkern.distributed import resolve_vocab_parallel
        resolve_vocab_parallel(dw, None, None)
    except TypeError as e:
        got["dtensor_unflagged"] = str(e)
    return got


@pytest.fixture(scope="module")
def world2():
    return spawn(vp_worker, 2, (37,), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def world3():
    return spawn(vp_worker, 3, (37, 2), True, timeout=TIMEOUT)


# ---- the checks ----------------------------------------------------------------------------------------------


def _torch_linear(hidden, weight, bias, labels, upstream):
    x, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    logp = prefkern.linear_logprobs(x, w, labels, b, ignore_index=IGNORE, backend="torch")
    (logp * upstream.to(logp.dtype)).sum().backward()
    return {"logp": logp.detach(), "dx": x.grad, "dw": w.grad, "db": b.grad}


def check_close(name, got, want, dtype, torch_d=None, ref64=None):
    """fp32: 1e-5 relative to the unsplit result (plus 1e-6 absolute); bf16: DESIGN.md section 9's rule."""
    if dtype == torch.float32:
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    else:
        assert_within_torch_error(got.float(), torch_d.float(), ref64, dtype, name)


def assemble(results, name, key, v, world):
    """The full [V, ...] tensor of a sliced gradient, rank slices concatenated."""
    parts = [results[r][key][name] for r in range(world)]
    assert sum(p.shape[0] for p in parts) == v
    return torch.cat(parts)


@pytest.mark.parametrize("world,v", [(2, 37), (3, 37), (3, 2)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_logprobs_matches_unsplit(world, v, dtype, world2, world3):
    results = world2 if world == 2 else world3
    hidden, weight, bias, labels, upstream, _ = make_case(v, world, dtype)
    key = (v, str(dtype), "linear")
    want = run_linear(hidden, weight, bias, labels, upstream, None)
    r64 = _torch_linear(hidden.double(), weight.double(), bias.double(), labels, upstream.double())
    rd = _torch_linear(hidden, weight, bias, labels, upstream)  # plain torch in dtype d (materialised logits)
    for r in range(world):  # the same log-probs and dX on every rank
        got = results[r][key]
        check_close("logp", got["logp"], want["logp"], dtype, rd["logp"], r64["logp"])
        check_close("dx", got["dx"], want["dx"], dtype, rd["dx"], r64["dx"])
        assert torch.equal(got["logp"], results[0][key]["logp"]) and torch.equal(got["dx"], results[0][key]["dx"])
        torch.testing.assert_close(results[r][(v, str(dtype), "no_grad")], got["logp"], rtol=1e-6, atol=1e-6)
        assert bool((got["logp"][labels == IGNORE] == 0).all()) and bool((got["dx"][labels == IGNORE] == 0).all())
    check_close("dw", assemble(results, "dw", key, v, world), want["dw"], dtype, rd["dw"], r64["dw"])
    check_close("db", assemble(results, "db", key, v, world), want["db"], dtype, rd["db"], r64["db"])


def test_slices_cover_each_rank_and_one_is_empty(world3):
    assert [world3[r]["slices"][2] for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    assert [world3[r]["slices"][37] for r in range(3)] == [(0, 13), (13, 26), (26, 37)]
    hidden, weight, bias, labels, *_ = make_case(37, 3, torch.float32)
    owners = {min(int(y) // 13, 2) for y in labels[labels != IGNORE]}
    assert owners == {0, 1, 2}


@pytest.mark.parametrize("world,v", [(2, 37), (3, 37), (3, 2)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["stream", "eager"])
@pytest.mark.parametrize("unpaired", [False, True], ids=["dpo", "kto"])
def test_fused_loss_matches_unsplit(world, v, dtype, mode, unpaired, world2, world3):
    results = world2 if world == 2 else world3
    hidden, weight, bias, labels, _, ref = make_case(v, world, dtype)
    key = (v, str(dtype), mode) + (("kto",) if unpaired else ())
    want = run_fused(hidden, weight, bias, labels, ref, mode, None, unpaired)
    if dtype != torch.float32:  # DESIGN.md section 9: plain torch in dtype d sets the bar against float64
        r64 = run_fused(hidden.double(), weight.double(), bias.double(), labels, ref.double(), "stream", None,
                        unpaired)
        rd = run_fused(hidden, weight, bias, labels, ref, "stream", None, unpaired, backend="torch")
    else:
        r64 = rd = {}
    for r in range(world):
        got = results[r][key]
        assert got["eager"] == want["eager"] == (mode == "eager")
        for name in ("loss", "tok", "dx"):
            check_close(name, got[name], want[name], dtype, rd.get(name), r64.get(name))
    for name in ("dw", "db"):
        check_close(name, assemble(results, name, key, v, world), want[name], dtype, rd.get(name), r64.get(name))


@pytest.fixture(scope="module")
def errors3(world3):
    return [got["errors"] for got in world3]


def test_errors_raise_on_every_rank(errors3):
    for r, got in enumerate(errors3):
        assert "owned by [0.0] ranks" in got["out_of_range"], got
        if r > 0:
            assert "owned by [2.0] ranks" in got["overlap"] or "owned by [" in got["overlap"], got
        assert "weight_shard must be this rank's slice" in got["shape"], got
        assert "vocab_parallel=True" in got["dtensor_unflagged"]


def test_dtensor_shard0_weight(errors3):
    hidden, weight, bias, labels, upstream, _ = make_case(37, 3, torch.float32)
    want = run_linear(hidden, weight, bias, labels, upstream, None)
    for got in errors3:
        d = got["dtensor"]
        assert d["grad_placements"] == "(Shard(dim=0),)"
        for name in ("logp", "dx", "dw", "db"):
            torch.testing.assert_close(d[name], want[name], rtol=1e-5, atol=1e-6)
