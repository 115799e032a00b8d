"""prefkern on real gloo process groups (127.0.0.1 only), against one process.

- Vocab-parallel lm-head (DESIGN.md section 10): values and gradients equal those of the unsplit head; V is not
  divisible by the world size (37 = 19 + 18 on 2 ranks, 13 + 13 + 11 on 3; V = 2 on 3 ranks leaves the last slice
  empty), a label owned by each rank, ignored tokens, fp32 and bf16, stream and eager, DPO and KTO.
- Data parallel: DDP (2 ranks) and FSDP2 ``fully_shard`` (3 ranks) give, after one SGD step, the same parameters on
  every rank and the same parameters as one process on the whole batch. Normalisation (TRL's): each rank's loss is
  the mean over its own pairs; DDP averages the gradients over the ranks (FSDP2's reduce-scatter too), so with the
  same number of pairs per rank one step equals one process with the mean over all pairs. Every model computes its
  loss inside its forward (the pattern FSDP2 needs: the lm-head weight is gathered only there).
- ZeRO-3-style gathered heads: the contract (no reference to the gathered storage past the call, the gradient on
  the parameter) in one process, and DeepSpeed ZeRO-3 itself when it is installed.

One spawn per world size runs every case of that size (a module fixture) and the tests read its results: the
start-up of torch in the processes is the cost, not the cases. Each spawn is bounded by a timeout.
"""

from __future__ import annotations

import gc
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prefkern
from prefkern.compat.liger import LigerFusedLinearDPOLoss
from prefkern.distributed import VocabParallel, vocab_parallel_fused_loss, vocab_parallel_linear_logprobs
from prefkern.distributed.launch import spawn
from prefkern.fused import CatalogObjective, CatalogUnpairedObjective, EngineOptions, fused_loss
from prefkern.fused.engine import FusedResult

from tolerance import assert_within_torch_error

IGNORE = -100
H, T, PAIRS = 16, 6, 2
TIMEOUT = 150.0
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


def public_api_wired() -> bool:
    """Whether the core takes ``vocab_parallel=`` (FusedLinearPreferenceLoss, linear_logprobs)."""
    import inspect

    return "vocab_parallel" in inspect.signature(prefkern.FusedLinearPreferenceLoss.__init__).parameters


def public_api_worker(rank: int, world: int):
    """The public front ends with ``vocab_parallel=``: DPO eager and stream with a reference model through the
    split head, KTO with its KL batch, linear_logprobs, and a Shard(0) DTensor head (refused without the flag)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    v = 37
    hidden, weight, bias, labels, upstream, _ = make_case(v, world, torch.float32)
    start, stop = bounds(v, world, rank)
    vp = VocabParallel(None, start, stop)
    ref_hidden = hidden + 0.01
    out = {}
    for mode in ("eager", "stream"):
        x = hidden.clone().requires_grad_()
        w = weight[start:stop].clone().requires_grad_()
        loss = prefkern.FusedLinearPreferenceLoss("sigmoid", beta=0.5, mode=mode, ignore_index=IGNORE,
                                                  vocab_parallel=vp)
        res = loss(x, w, labels, ref_hidden=ref_hidden)
        res.loss.backward()
        out[mode] = {"loss": res.loss.detach(), "dx": x.grad, "dw": w.grad}
    x = hidden.clone().requires_grad_()
    w = weight[start:stop].clone().requires_grad_()
    kto = prefkern.FusedLinearPreferenceLoss("kto", beta=0.3, ignore_index=IGNORE, vocab_parallel=vp)
    res = kto(x, w, labels, ref_hidden=ref_hidden, desirable=torch.tensor([True, False, True, False]),
              kl_hidden=hidden.flip(0), kl_labels=labels, ref_kl_hidden=ref_hidden.flip(0))
    res.loss.backward()
    out["kto"] = {"loss": res.loss.detach(), "dx": x.grad, "dw": w.grad}
    out["linear"] = prefkern.linear_logprobs(hidden, weight[start:stop], labels, ignore_index=IGNORE,
                                             vocab_parallel=vp)
    mesh = init_device_mesh("cpu", (world,))
    dw = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    x = hidden.clone().requires_grad_()
    res = prefkern.FusedLinearPreferenceLoss("sigmoid", beta=0.5, ignore_index=IGNORE, vocab_parallel=True)(
        x, dw, labels, ref_hidden=ref_hidden)
    res.loss.backward()
    out["dtensor"] = {"loss": res.loss.detach(), "dx": x.grad, "dw": dw.grad.full_tensor()}
    try:
        prefkern.FusedLinearPreferenceLoss("sigmoid", beta=0.5, ignore_index=IGNORE)(hidden, dw, labels,
                                                                                    ref_hidden=ref_hidden)
    except TypeError as e:
        out["dtensor_unflagged"] = str(e)
    return out


def worker(rank: int, world: int, vocab_sizes, dp_wrapper: str, with_errors: bool = False):
    """Every case of one world size: vocab parallel, then data parallel with ``dp_wrapper`` (ddp or fsdp)."""
    out = vp_worker(rank, world, vocab_sizes)
    if public_api_wired():
        out["public"] = public_api_worker(rank, world)
    out["dp"] = dp_worker(rank, world, dp_wrapper)
    if with_errors:
        out["errors"] = errors_worker(rank, world)
    return out


def vp_worker(rank: int, world: int, vocab_sizes):
    out = {}
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
    v = vocab_sizes[0]
    start, stop = bounds(v, world, rank)
    hidden, weight, bias, labels, _, ref = make_case(v, world, torch.float32)
    nan_hidden = hidden.clone()
    nan_hidden[2, 4, 0] = float("nan")  # NaN never hides: that token's log-prob is NaN on every rank
    out["nan"] = vocab_parallel_linear_logprobs(nan_hidden, weight[start:stop], labels, None,
                                                VocabParallel(None, start, stop), IGNORE)
    out["shift"] = vocab_parallel_linear_logprobs(hidden, weight[start:stop], labels, None,
                                                  VocabParallel(None, start, stop), IGNORE, shift=1)
    return out


def errors_worker(rank: int, world: int):
    """Errors that every rank must raise alike (no rank left waiting in a collective)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    v = 37
    hidden, weight, bias, labels, upstream, ref = make_case(v, world, torch.float32)
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
    from prefkern.distributed import resolve_vocab_parallel

    x = hidden.clone().requires_grad_()
    w_local, b_local, vp = resolve_vocab_parallel(dw, db, True)  # the engine's route for a DTensor head
    dw.grad = db.grad = None
    res = vocab_parallel_fused_loss(x, w_local, b_local, labels, dpo_objective(labels, ref),
                                    EngineOptions(ignore_index=IGNORE, mode="eager"), vp)
    (res.output.loss + 0.25 * res.output.losses.sum()).backward()  # as run_fused
    got["dtensor_fused"] = {"loss": res.output.loss.detach(), "dx": x.grad, "dw": dw.grad.full_tensor(),
                            "db": db.grad.full_tensor()}
    try:
        resolve_vocab_parallel(dw, None, None)
    except TypeError as e:
        got["dtensor_unflagged"] = str(e)
    return got


@pytest.fixture(scope="module")
def world2():
    return spawn(worker, 2, (37,), "ddp", timeout=TIMEOUT)


@pytest.fixture(scope="module")
def world3():
    return spawn(worker, 3, (37, 2), "fsdp", True, timeout=TIMEOUT)


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


@pytest.mark.parametrize("world", [2, 3])
def test_nan_and_shift(world, world2, world3):
    results = world2 if world == 2 else world3
    hidden, weight, bias, labels, _, _ = make_case(37, world, torch.float32)
    nan_hidden = hidden.clone()
    nan_hidden[2, 4, 0] = float("nan")
    want_nan = prefkern.linear_logprobs(nan_hidden, weight, labels, ignore_index=IGNORE)
    want_shift = prefkern.linear_logprobs(hidden, weight, labels, ignore_index=IGNORE, shift=1)
    for got in results:
        assert torch.equal(torch.isnan(got["nan"]), torch.isnan(want_nan)) and bool(torch.isnan(got["nan"][2, 4]))
        torch.testing.assert_close(got["nan"], want_nan, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(got["shift"], want_shift, rtol=1e-5, atol=1e-6)


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


def test_dtensor_shard0_weight_fused_loss(errors3):
    hidden, weight, bias, labels, _, ref = make_case(37, 3, torch.float32)
    want = run_fused(hidden, weight, bias, labels, ref, "eager", None)
    for got in errors3:
        d = got["dtensor_fused"]
        for name in ("loss", "dx", "dw", "db"):
            torch.testing.assert_close(d[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not public_api_wired(), reason="the core does not take vocab_parallel= yet")
@pytest.mark.parametrize("world", [2, 3])
def test_public_api_vocab_parallel(world, world2, world3):
    results = world2 if world == 2 else world3
    hidden, weight, bias, labels, _, _ = make_case(37, world, torch.float32)
    ref_hidden = hidden + 0.01
    want = {}
    for mode in ("eager", "stream"):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        res = prefkern.FusedLinearPreferenceLoss("sigmoid", beta=0.5, mode=mode, ignore_index=IGNORE)(
            x, w, labels, ref_hidden=ref_hidden)
        res.loss.backward()
        want[mode] = {"loss": res.loss.detach(), "dx": x.grad, "dw": w.grad}
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    res = prefkern.FusedLinearPreferenceLoss("kto", beta=0.3, ignore_index=IGNORE)(
        x, w, labels, ref_hidden=ref_hidden, desirable=torch.tensor([True, False, True, False]),
        kl_hidden=hidden.flip(0), kl_labels=labels, ref_kl_hidden=ref_hidden.flip(0))
    res.loss.backward()
    want["kto"] = {"loss": res.loss.detach(), "dx": x.grad, "dw": w.grad}
    want["dtensor"] = want["eager"]
    linear = prefkern.linear_logprobs(hidden, weight, labels, ignore_index=IGNORE)
    for rank, got in enumerate(results):
        start, stop = bounds(37, world, rank)
        pub = got["public"]
        torch.testing.assert_close(pub["linear"], linear, rtol=1e-5, atol=1e-6)
        assert "vocab_parallel=True" in pub["dtensor_unflagged"]
        for case in ("eager", "stream", "kto", "dtensor"):
            torch.testing.assert_close(pub[case]["loss"], want[case]["loss"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(pub[case]["dx"], want[case]["dx"], rtol=1e-5, atol=1e-6)
            dw = pub[case]["dw"] if case == "dtensor" else None
            if dw is not None:
                torch.testing.assert_close(dw, want[case]["dw"], rtol=1e-5, atol=1e-6)
            else:
                torch.testing.assert_close(pub[case]["dw"], want[case]["dw"][start:stop], rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_before_any_collective():
    """Checked on each rank before communication (no process group needed), naming the argument."""
    from prefkern.distributed import resolve_vocab_parallel

    hidden, weight, bias, labels, _, _ = make_case(37, 2, torch.float32)
    vp = VocabParallel(None, 0, 19)
    with pytest.raises(TypeError, match="process_group"):
        VocabParallel("world", 0, 19)
    with pytest.raises(ValueError, match="start and stop"):
        VocabParallel(None, 5, 2)
    with pytest.raises(TypeError, match="start"):
        VocabParallel(None, 0.5, 2)
    with pytest.raises(TypeError, match="vocab_parallel"):
        resolve_vocab_parallel(weight, None, "yes")
    with pytest.raises(TypeError, match="DTensor"):
        VocabParallel.from_dtensor(weight)
    with pytest.raises(ValueError, match="options"):
        vocab_parallel_linear_logprobs(hidden, weight[:19], labels, None, None)
    with pytest.raises(TypeError, match="weight_shard must have the dtype"):
        vocab_parallel_linear_logprobs(hidden, weight[:19].double(), labels, None, vp)
    with pytest.raises(ValueError, match="bias_shard"):
        vocab_parallel_linear_logprobs(hidden, weight[:19], labels, bias, vp)
    with pytest.raises(ValueError, match="labels"):
        vocab_parallel_linear_logprobs(hidden, weight[:19], labels[:, :3], None, vp)
    with pytest.raises(TypeError, match="hidden"):
        vocab_parallel_linear_logprobs(hidden.double(), weight[:19].double(), labels, None, vp)
    with pytest.raises(ValueError, match="chunk_rows"):
        vocab_parallel_linear_logprobs(hidden, weight[:19], labels, None, vp, chunk_rows=0)


def test_dtensor_shard0_weight(errors3):
    hidden, weight, bias, labels, upstream, _ = make_case(37, 3, torch.float32)
    want = run_linear(hidden, weight, bias, labels, upstream, None)
    for got in errors3:
        d = got["dtensor"]
        assert d["grad_placements"] == "(Shard(dim=0),)"
        for name in ("logp", "dx", "dw", "db"):
            torch.testing.assert_close(d[name], want[name], rtol=1e-5, atol=1e-6)


# ---- data parallel ---------------------------------------------------------------------------------------------

D_IN, K, V_DP = 8, 3, 37
PAIRS_PER_RANK = 2
LR = 0.5
KINDS = ("eager", "stream", "liger", "ensemble")


class Policy(nn.Module):
    """A body (one linear layer) and an lm-head; forward returns the preference loss of its batch."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Linear(D_IN, H)
        if kind == "ensemble":
            self.head = prefkern.EnsembleRewardHead(H, K)
        else:
            self.lm_head = nn.Linear(H, V_DP, bias=False)
        if kind in ("eager", "stream"):
            self.loss = prefkern.FusedLinearPreferenceLoss("sigmoid", beta=0.5, mode=kind)
        elif kind == "liger":
            self.loss = LigerFusedLinearDPOLoss(beta=0.5, use_ref_model=False)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None, ref: Optional[torch.Tensor] = None):
        h = self.body(x)
        if labels is None:  # the hidden states only (the DeepSpeed test gathers the head by hand)
            return h
        if self.kind == "ensemble":
            combined = self.head(h, (labels != IGNORE).to(torch.int64)).combined
            b = combined.shape[0] // 2
            return -F.logsigmoid(combined[:b] - combined[b:]).mean()
        if self.kind == "liger":
            return self.loss(self.lm_head.weight, h, labels)[0]
        return self.loss(h, self.lm_head.weight, labels, ref_logps=ref).loss


def make_model(kind: str, dtype: torch.dtype) -> Policy:
    torch.manual_seed(1)
    return Policy(kind).to(dtype)


def global_batch(world: int, dtype: torch.dtype):
    """[chosen; rejected] inputs of ``world * PAIRS_PER_RANK`` pairs: x [2P, T, D], labels [2P, T], ref [2P]."""
    g = torch.Generator().manual_seed(2)
    p = world * PAIRS_PER_RANK
    x = torch.randn(2 * p, T, D_IN, generator=g).to(dtype)
    labels = torch.randint(0, V_DP, (2 * p, T), generator=g)
    labels[:, :2] = IGNORE
    labels[3, -1] = IGNORE
    ref = torch.randn(2 * p, generator=g) - 5
    return x, labels, ref


def rank_rows(world: int, rank: int) -> torch.Tensor:
    """This rank's pairs, still as [chosen; rejected]."""
    p = world * PAIRS_PER_RANK
    pairs = torch.arange(rank * PAIRS_PER_RANK, (rank + 1) * PAIRS_PER_RANK)
    return torch.cat([pairs, pairs + p])


def one_step(model: nn.Module, x, labels, ref):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = model(x, labels, ref)
    loss.backward()
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    opt.step()
    return loss.detach().float(), grads, {n: _full(p.detach()).clone() for n, p in model.named_parameters()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _name(n: str) -> str:
    return n.replace("module.", "").replace("_fsdp_wrapped_module.", "")


def dp_worker(rank: int, world: int, wrapper: str):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for kind in KINDS:
        for dtype in DTYPES:
            model = make_model(kind, dtype)
            x, labels, ref = global_batch(world, dtype)
            rows = rank_rows(world, rank)
            if wrapper == "ddp":
                model = DDP(model)
            else:
                fully_shard(model)
            loss, grads, params = one_step(model, x[rows], labels[rows], ref[rows])
            out[(kind, str(dtype))] = {"loss": loss, "grads": {_name(n): g for n, g in grads.items()},
                                       "params": {_name(n): p for n, p in params.items()}}
    if wrapper == "fsdp":
        out["outside"] = fsdp_outside_forward(rank, world)
    return out


def fsdp_outside_forward(rank: int, world: int):
    """What a user meets passing an FSDP2 module's lm-head weight to the loss outside its forward."""
    from torch.distributed.fsdp import fully_shard

    model = make_model("eager", torch.float32)
    fully_shard(model)
    x, labels, ref = global_batch(world, torch.float32)
    rows = rank_rows(world, rank)
    hidden = torch.randn(rows.numel(), T, H, requires_grad=True)
    got = {"placements": str(model.lm_head.weight.placements)}
    try:
        model.loss(hidden, model.lm_head.weight, labels[rows], ref_logps=ref[rows])
        got["error"] = None
    except (TypeError, RuntimeError) as e:
        got["error"] = f"{type(e).__name__}: {e}"
    # FSDP's unshard() outside forward: the loss runs, but the gradient never reaches the sharded parameter
    model.unshard()
    model.loss(hidden, model.lm_head.weight, labels[rows], ref_logps=ref[rows]).loss.backward()
    model.reshard()
    got["unshard_grad"] = None if model.lm_head.weight.grad is None else "set"
    return got


def single_process(kind: str, dtype: torch.dtype, world: int, compute=None):
    """One process, the whole batch; ``compute`` (float64) runs the same initial values in another dtype."""
    model = make_model(kind, dtype)
    x, labels, ref = global_batch(world, dtype)
    if compute is not None:
        model = model.to(compute)
        x = x.to(compute)
    return one_step(model, x, labels, ref)


@pytest.fixture(scope="module")
def ddp2(world2):
    return [got["dp"] for got in world2]


@pytest.fixture(scope="module")
def fsdp3(world3):
    return [got["dp"] for got in world3]


def check_params(name, got, want, dtype, world, kind):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        return
    # DESIGN.md section 9: plain torch in bf16 (the same step, one process) against float64 sets the bar
    _, _, p64 = single_process(kind, dtype, world, compute=torch.float64)
    _, _, pd = single_process(kind, dtype, world)
    n = name.split(":")[-1]
    assert_within_torch_error(got.float(), pd[n].float(), p64[n], dtype, name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_one_step_equals_one_process(wrapper, kind, dtype, ddp2, fsdp3):
    results, world = (ddp2, 2) if wrapper == "ddp" else (fsdp3, 3)
    key = (kind, str(dtype))
    want_loss, want_grads, want_params = single_process(kind, dtype, world)
    for r in range(world):
        got = results[r][key]
        assert set(got["params"]) == set(want_params)
        for n, p in got["params"].items():
            # the same parameters on every rank, bit for bit
            assert torch.equal(p, results[0][key]["params"][n]), f"rank {r} {n} differs from rank 0"
            check_params(f"{wrapper}:{kind}:rank{r}:{n}", p, want_params[n], dtype, world, kind)
        if dtype == torch.float32:
            for n, g in got["grads"].items():  # the hooks reduced the (eager: forward-time) gradients
                torch.testing.assert_close(g, want_grads[n], rtol=1e-5, atol=1e-6)
    # per-rank mean, then the average over ranks = the mean over the whole batch
    mean_loss = torch.stack([results[r][key]["loss"] for r in range(world)]).mean()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mean_loss, want_loss, **tol)


def test_fsdp_weight_outside_forward(fsdp3):
    for got in fsdp3:
        assert got["outside"]["placements"] == "(Shard(dim=0),)"
        assert got["outside"]["error"] is not None  # refused, never a silent wrong result
        assert got["outside"]["unshard_grad"] is None  # why unshard() outside forward is no way either


# ---- ZeRO-3-style gathered heads --------------------------------------------------------------------------------


def _gathered_step(mode: str, backward_inside: bool):
    """A parameter materialised only inside a gather, as DeepSpeed ZeRO-3 does it: ``param.data`` is the gathered
    head inside, an empty tensor outside. Returns (the gathered storage freed after the call?, grad or error)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    torch.manual_seed(3)
    full = torch.randn(V_DP, H)
    hidden = torch.randn(4, T, H, requires_grad=True)
    labels = torch.randint(0, V_DP, (4, T))
    labels[:, :2] = IGNORE
    ref = torch.randn(4) - 5
    param = nn.Parameter(torch.empty(0))
    loss_fn = prefkern.FusedLinearPreferenceLoss("sigmoid", beta=0.5, mode=mode)
    gathered = full.clone()
    storage = StorageWeakRef(gathered.untyped_storage())
    param.data = gathered  # enter the gather
    del gathered
    out = loss_fn(hidden, param, labels, ref_logps=ref)
    error = None
    if backward_inside:
        out.loss.backward()
    param.data = torch.empty(0)  # leave it: the framework frees the gathered head
    if not backward_inside:
        try:
            out.loss.backward()
        except RuntimeError as e:
            error = str(e)
    gc.collect()
    freed = storage.expired()  # `out` (its graph, token log-probs) is still alive here
    w = full.clone().requires_grad_()
    loss_fn(hidden.detach(), w, labels, ref_logps=ref).loss.backward()
    return freed, param.grad, w.grad, error


@pytest.mark.parametrize("mode", ["eager", "stream"])
def test_gathered_head_contract(mode):
    freed, grad, want, _ = _gathered_step(mode, backward_inside=True)
    assert freed, "prefkern kept a reference to the gathered weight's storage past the call"
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["eager", "stream"])
def test_gathered_head_backward_after_release_raises(mode):
    # torch's AccumulateGrad lays a [V, H] gradient out like the parameter, now empty: backward() must run while
    # the head is gathered (in both modes); it fails loudly otherwise, never silently
    freed, grad, _, error = _gathered_step(mode, backward_inside=False)
    assert freed and grad is None and error is not None


def deepspeed_worker(rank: int, world: int):
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": PAIRS_PER_RANK, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
           "optimizer": {"type": "SGD", "params": {"lr": LR}}}
    out = {}
    for kind in ("eager", "stream"):
        model = make_model(kind, torch.float32)
        engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
        x, labels, ref = global_batch(world, torch.float32)
        rows = rank_rows(world, rank)
        hidden = engine(x[rows])
        weight = engine.module.lm_head.weight
        sharded = tuple(weight.shape)
        with deepspeed.zero.GatheredParameters([weight]):
            # a loss module outside the engine's module tree: ZeRO-3 hooks every submodule's forward and backward
            loss_fn = prefkern.FusedLinearPreferenceLoss("sigmoid", beta=0.5, mode=kind)
            loss = loss_fn(hidden, weight, labels[rows], ref_logps=ref[rows]).loss
            engine.backward(loss)
        engine.step()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        out[kind] = {"params": params, "sharded_shape": sharded}
    return out


@pytest.fixture(scope="module")
def deepspeed2():
    pytest.importorskip("deepspeed")
    return spawn(deepspeed_worker, 2, timeout=TIMEOUT)


@pytest.mark.parametrize("kind", ["eager", "stream"])
def test_deepspeed_zero3_gathered_head(kind, deepspeed2):
    """DeepSpeed ZeRO-3 (CPU, gloo): the loss and ``engine.backward`` inside ``GatheredParameters``; one step equals
    one process (skipped where DeepSpeed is not installed)."""
    results = deepspeed2
    _, _, want = single_process(kind, torch.float32, 2)
    for got in results:
        assert got[kind]["sharded_shape"] == (0,)  # the head is partitioned outside the gather
        for n, p in got[kind]["params"].items():
            torch.testing.assert_close(p, want[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{kind} {n}: {m}")


# ---- NCCL (more than one GPU; run by benchmarks/gpu_check.sh on such a host) ----------------------------------


def nccl_worker(rank: int, world: int):
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = torch.device("cuda", rank)
    out = {}
    for dtype in DTYPES:
        hidden, weight, bias, labels, upstream, ref = make_case(37, world, dtype)
        start, stop = bounds(37, world, rank)
        to = lambda t: t.to(dev)  # noqa: E731
        got = run_linear(to(hidden), to(weight[start:stop]), to(bias[start:stop]), to(labels), to(upstream),
                         VocabParallel(None, start, stop))
        out[("linear", str(dtype))] = {k: v.cpu() for k, v in got.items()}
        for mode in ("stream", "eager"):
            got = run_fused(to(hidden), to(weight[start:stop]), to(bias[start:stop]), to(labels), to(ref), mode,
                            VocabParallel(None, start, stop))
            out[(mode, str(dtype))] = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in got.items()}
    model = DDP(make_model("eager", torch.float32).to(dev), device_ids=[rank])
    x, labels, ref = global_batch(world, torch.float32)
    rows = rank_rows(world, rank)
    _, _, params = one_step(model, x[rows].to(dev), labels[rows].to(dev), ref[rows].to(dev))
    out["ddp"] = {_name(n): p.cpu() for n, p in params.items()}
    return out


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_nccl_vocab_parallel_and_ddp():
    """The same checks on 2 GPUs with NCCL: vocab-parallel values and gradients against the unsplit head on the CPU
    (fp32: 1e-4 relative, the GPU GEMMs round differently; bf16: 3e-2), and one DDP step against one process."""
    results = spawn(nccl_worker, 2, timeout=TIMEOUT, backend="nccl")
    for dtype in DTYPES:
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        hidden, weight, bias, labels, upstream, ref = make_case(37, 2, dtype)
        want = run_linear(hidden, weight, bias, labels, upstream, None)
        for name in ("logp", "dx"):
            for got in results:
                torch.testing.assert_close(got[("linear", str(dtype))][name].float(), want[name].float(), **tol)
        for name in ("dw", "db"):
            torch.testing.assert_close(assemble(results, name, ("linear", str(dtype)), 37, 2).float(),
                                       want[name].float(), **tol)
        for mode in ("stream", "eager"):
            want = run_fused(hidden, weight, bias, labels, ref, mode, None)
            for got in results:
                torch.testing.assert_close(got[(mode, str(dtype))]["loss"], want["loss"], **tol)
    _, _, want = single_process("eager", torch.float32, 2)
    for got in results:
        for n, p in got["ddp"].items():
            torch.testing.assert_close(p, want[n], rtol=1e-4, atol=1e-5)
