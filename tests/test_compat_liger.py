"""prefkern.compat.liger against Liger-Kernel 0.8.5 (when installed) and against materialised logits.

Every Liger comparison runs the same fp32 inputs through Liger's class (``compiled=False``) and ours and
compares the loss, every aux output and the gradients w.r.t. ``_input``, ``lin_weight`` and ``bias``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F

import prefkern.compat.liger as ours

B, T, H, V = 2, 7, 16, 37
IGNORE = -100
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture
def liger():
    return pytest.importorskip("liger_kernel.chunked_loss")


def make_batch(rows: int = 2 * B, seed: int = 0, ignore_index: int = IGNORE, bias: bool = True):
    """Hidden states, heads and targets with ignored prompt and padding positions of varying length."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g) * 0.7
    weight = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    target = torch.randint(0, V, (rows, T), generator=g)
    for r in range(rows):
        prompt = 1 + r % 3
        target[r, :prompt] = ignore_index
        if r % 2:
            target[r, -1] = ignore_index
    ref_hidden = hidden + 0.3 * torch.randn(rows, T, H, generator=g)
    ref_weight = weight + 0.1 * torch.randn(V, H, generator=g)
    ref_bias = None if b is None else b + 0.1 * torch.randn(V, generator=g)
    return dict(hidden=hidden, weight=weight, bias=b, target=target, ref_hidden=ref_hidden, ref_weight=ref_weight,
                ref_bias=ref_bias)


def run(call, data, grad_scale: float = 1.0):
    """Call ``call(hidden, weight, bias)`` on fresh leaves; return (loss, aux, grads)."""
    hidden = data["hidden"].clone().requires_grad_()
    weight = data["weight"].clone().requires_grad_()
    bias = None if data["bias"] is None else data["bias"].clone().requires_grad_()
    loss, aux = call(hidden, weight, bias)
    (loss * grad_scale).backward()
    grads = {"_input": hidden.grad, "lin_weight": weight.grad}
    if bias is not None:
        grads["bias"] = bias.grad
    return loss.detach(), tuple(aux), grads


def assert_close(a, b, name):
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), name
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    torch.testing.assert_close(a.float(), b.float(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def compare(got, want):
    loss_g, aux_g, grads_g = got
    loss_w, aux_w, grads_w = want
    assert_close(loss_g, loss_w, "loss")
    assert len(aux_g) == len(aux_w), f"aux has {len(aux_g)} outputs, Liger {len(aux_w)}"
    for i, (x, y) in enumerate(zip(aux_g, aux_w)):
        assert not x.requires_grad, f"aux[{i}] should be detached"
        assert_close(x, y, f"aux[{i}]")
    assert grads_g.keys() == grads_w.keys()
    for k in grads_g:
        assert_close(grads_g[k], grads_w[k], f"grad {k}")


def paired(module, data, **kw):
    return lambda h, w, b: module(w, h, data["target"], b, **kw)


# ---- against Liger 0.8.5 -----------------------------------------------------------------------------------

DPO_TYPES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
             "apo_down", "discopop"]


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_matches_liger_with_reference(liger, loss_type):
    data = make_batch(seed=1)
    smoothing = {"robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0)
    kw = dict(beta=0.5, loss_type=loss_type, label_smoothing=smoothing, chunk_size=1)
    ref = dict(ref_input=data["ref_hidden"], ref_weight=data["ref_weight"], ref_bias=data["ref_bias"])
    want = run(paired(liger.LigerFusedLinearDPOLoss(compiled=False, **kw), data, **ref), data)
    got = run(paired(ours.LigerFusedLinearDPOLoss(**kw), data, **ref), data)
    compare(got, want)


@pytest.mark.parametrize("options", [
    dict(use_ref_model=False),
    dict(use_ref_model=False, compute_nll_loss=True, alpha=0.7, average_log_prob=True),
    dict(use_ref_model=True, compute_nll_loss=True, average_log_prob=True, chunk_size=2),
    dict(use_ref_model=True, loss_type="discopop", discopop_tau=0.3, beta=1.0),
])
@pytest.mark.parametrize("bias", [True, False])
def test_dpo_options_match_liger(liger, options, bias):
    data = make_batch(seed=2, bias=bias)
    ref = dict(ref_input=data["ref_hidden"], ref_weight=data["ref_weight"], ref_bias=data["ref_bias"])
    want = run(paired(liger.LigerFusedLinearDPOLoss(compiled=False, **options), data, **ref), data, grad_scale=3.0)
    got = run(paired(ours.LigerFusedLinearDPOLoss(**options), data, **ref), data, grad_scale=3.0)
    compare(got, want)


@pytest.mark.parametrize("options", [dict(), dict(beta=0.3, compute_nll_loss=False), dict(chunk_size=2)])
@pytest.mark.parametrize("bias", [True, False])
def test_orpo_matches_liger(liger, options, bias):
    data = make_batch(seed=3, bias=bias)
    want = run(paired(liger.LigerFusedLinearORPOLoss(compiled=False, **options), data), data)
    got = run(paired(ours.LigerFusedLinearORPOLoss(**options), data), data)
    compare(got, want)


def test_orpo_nll_target_matches_liger(liger):
    data = make_batch(seed=4)
    nll_target = data["target"].clone()
    nll_target[:, 1:3] = torch.randint(0, V, (2 * B, 2))  # part of the prompt enters the NLL
    want = run(paired(liger.LigerFusedLinearORPOLoss(compiled=False), data, nll_target=nll_target), data)
    got = run(paired(ours.LigerFusedLinearORPOLoss(), data, nll_target=nll_target), data)
    compare(got, want)


@pytest.mark.parametrize("options", [
    dict(), dict(average_log_prob=True, label_smoothing=0.1), dict(compute_nll_loss=False, beta=0.4),
    dict(alpha=0.3, chunk_size=2),
])
@pytest.mark.parametrize("bias", [True, False])
def test_cpo_matches_liger(liger, options, bias):
    data = make_batch(seed=5, bias=bias)
    want = run(paired(liger.LigerFusedLinearCPOLoss(compiled=False, **options), data), data)
    got = run(paired(ours.LigerFusedLinearCPOLoss(**options), data), data)
    compare(got, want)


@pytest.mark.parametrize("options", [
    dict(), dict(beta=2.0, gamma=0.8, label_smoothing=0.1), dict(compute_nll_loss=False), dict(alpha=0.5, chunk_size=2),
])
@pytest.mark.parametrize("bias", [True, False])
def test_simpo_matches_liger(liger, options, bias):
    data = make_batch(seed=6, bias=bias)
    want = run(paired(liger.LigerFusedLinearSimPOLoss(compiled=False, **options), data), data)
    got = run(paired(ours.LigerFusedLinearSimPOLoss(**options), data), data)
    compare(got, want)


KTO_LABELS = torch.tensor([True, False, True, True, False])


@pytest.mark.parametrize("use_ref_model", [True, False])
@pytest.mark.parametrize("kl", [None, "float", "scalar", "per_row"])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_kto_matches_liger(liger, use_ref_model, kl, average_log_prob):
    n = KTO_LABELS.numel()
    data = make_batch(rows=n, seed=7)
    kl_value = {None: None, "float": -0.3, "scalar": torch.tensor(0.4), "per_row": torch.linspace(-0.2, 0.6, n)}[kl]
    # Liger pairs row i with kl[i] only when the batch is one chunk (see the module docstring).
    chunk = n if kl == "per_row" else 2
    kw = dict(beta=0.3, use_ref_model=use_ref_model, average_log_prob=average_log_prob, chunk_size=chunk)
    extra = dict(preference_labels=KTO_LABELS, ref_input=data["ref_hidden"], ref_weight=data["ref_weight"],
                 ref_bias=data["ref_bias"], kl=kl_value)

    def call(module):
        return lambda h, w, b: module(h, w, data["target"], b, **extra)

    want = run(call(liger.LigerFusedLinearKTOLoss(compiled=False, **kw)), data)
    got = run(call(ours.LigerFusedLinearKTOLoss(**kw)), data)
    compare(got, want)


def test_kto_no_bias_matches_liger(liger):
    n = KTO_LABELS.numel()
    data = make_batch(rows=n, seed=8, bias=False)
    call = lambda m: lambda h, w, b: m(h, w, data["target"], b, preference_labels=KTO_LABELS)  # noqa: E731
    compare(run(call(ours.LigerFusedLinearKTOLoss()), data),
            run(call(liger.LigerFusedLinearKTOLoss(compiled=False)), data))


def test_signatures_match_liger(liger):
    import inspect

    for name in ours.__all__:
        theirs, mine = getattr(liger, name), getattr(ours, name)
        for attr in ("__init__", "forward"):
            a = inspect.signature(getattr(theirs, attr)).parameters
            b = inspect.signature(getattr(mine, attr)).parameters
            assert list(a) == list(b), f"{name}.{attr}: {list(b)} != Liger {list(a)}"
            assert [p.default for p in a.values()] == [p.default for p in b.values()], f"{name}.{attr} defaults"


# ---- against materialised logits (no Liger needed) ------------------------------------------------------------


def materialised(hidden, weight, bias, target):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logp = F.log_softmax(logits.float(), dim=-1)
    mask = target != IGNORE
    tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return logits, tok, mask


def plain_paired(kind, hidden, weight, bias, target, *, beta, alpha=1.0, gamma=0.5, average=False,
                 ref=None, nll=True):
    logits, tok, mask = materialised(hidden, weight, bias, target)
    b = target.shape[0] // 2
    seq = tok.sum(-1) / (mask.sum(-1) if average else 1)
    c, r = seq[:b], seq[b:]
    nll_loss = -tok[:b].sum() / mask[:b].sum() if nll else torch.zeros(())
    extra = ()
    if kind == "dpo":
        rc, rr = (ref[:b], ref[b:]) if ref is not None else (0.0, 0.0)
        loss = -F.logsigmoid(beta * ((c - rc) - (r - rr))).mean()
        rewards = (beta * (c - rc), beta * (r - rr))
    elif kind == "orpo":
        z = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
        loss = -beta * F.logsigmoid(z).mean()
        rewards = (beta * c, beta * r)
        extra = (F.logsigmoid(z).mean(), z.mean())
    elif kind == "cpo":
        loss = -F.logsigmoid(beta * (c - r)).mean()
        rewards = (beta * c, beta * r)
    else:  # simpo
        loss = -F.logsigmoid(beta * (c - r) - gamma).mean()
        rewards = (beta * c, beta * r)
    loss = loss + alpha * nll_loss
    n = b * target.shape[1] * weight.shape[0]
    aux = (c, r, logits[:b].sum() / n, logits[b:].sum() / n, nll_loss, *rewards, *extra)
    return loss, tuple(x.detach() for x in aux)


@pytest.mark.parametrize("kind", ["dpo", "orpo", "cpo", "simpo"])
def test_paired_against_materialised_logits(kind):
    data = make_batch(seed=9)
    if kind == "dpo":
        module = ours.LigerFusedLinearDPOLoss(beta=0.5, compute_nll_loss=True, alpha=0.5)
        kw = dict(ref_input=data["ref_hidden"], ref_weight=data["ref_weight"], ref_bias=data["ref_bias"])
        with torch.no_grad():
            ref = materialised(data["ref_hidden"], data["ref_weight"], data["ref_bias"], data["target"])[1].sum(-1)
        plain_kw = dict(beta=0.5, alpha=0.5, ref=ref)
    elif kind == "orpo":
        module, kw, plain_kw = ours.LigerFusedLinearORPOLoss(beta=0.2), {}, dict(beta=0.2, average=True)
    elif kind == "cpo":
        module, kw, plain_kw = ours.LigerFusedLinearCPOLoss(beta=0.3, alpha=0.8), {}, dict(beta=0.3, alpha=0.8)
    else:
        module, kw = ours.LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.6), {}
        plain_kw = dict(beta=2.0, gamma=0.6, average=True)
    got = run(paired(module, data, **kw), data)
    want = run(lambda h, w, b: plain_paired(kind, h, w, b, data["target"], **plain_kw), data)
    compare(got, want)


PAIRED_MODULES = {
    "dpo": lambda: ours.LigerFusedLinearDPOLoss(beta=0.5, compute_nll_loss=True, alpha=0.5),
    "dpo_avg_robust": lambda: ours.LigerFusedLinearDPOLoss(beta=0.3, average_log_prob=True, loss_type="robust",
                                                           label_smoothing=0.1),
    "orpo": lambda: ours.LigerFusedLinearORPOLoss(beta=0.2),
    "cpo": lambda: ours.LigerFusedLinearCPOLoss(beta=0.3, alpha=0.8),
    "simpo": lambda: ours.LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.6, label_smoothing=0.1),
}


@pytest.mark.parametrize("kind", sorted(PAIRED_MODULES))
@pytest.mark.parametrize("pairs_per_chunk", [1, 2])
def test_eager_chunks_match_stream(kind, pairs_per_chunk, monkeypatch):
    """The eager path (3 matmul units, gradients per chunk of pairs) against the stream path, with the
    5-pair batch split into chunks of 1 and 2 pairs (the last chunk short)."""
    import prefkern.fused.eager
    import prefkern.fused.engine as engine

    data = make_batch(rows=10, seed=4)
    module = PAIRED_MODULES[kind]()
    kw = {}
    if kind.startswith("dpo"):
        kw = dict(ref_input=data["ref_hidden"], ref_weight=data["ref_weight"], ref_bias=data["ref_bias"])
    calls = []
    real = engine.eager_gradients

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "eager_gradients", spy)
    monkeypatch.setitem(prefkern.fused.eager.EAGER_TOKENS_PER_CHUNK, "cpu", 2 * T * pairs_per_chunk)
    eager = run(paired(module, data, **kw), data, grad_scale=1.7)
    assert calls, "the eager path was not taken"
    monkeypatch.setattr(engine, "wants_gradient", lambda *a: False)
    stream = run(paired(module, data, **kw), data, grad_scale=1.7)
    assert len(calls) == 1
    compare(eager, stream)


@pytest.mark.parametrize("examples_per_chunk", [1, 2])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_kto_eager_chunks_match_stream(examples_per_chunk, average_log_prob, monkeypatch):
    """KTO's eager path (chunks of whole examples) against its stream path, per-example kl."""
    import prefkern.fused.eager
    import prefkern.fused.engine as engine

    n = KTO_LABELS.numel()
    data = make_batch(rows=n, seed=5)
    module = ours.LigerFusedLinearKTOLoss(beta=0.3, average_log_prob=average_log_prob)
    extra = dict(preference_labels=KTO_LABELS, ref_input=data["ref_hidden"], ref_weight=data["ref_weight"],
                 ref_bias=data["ref_bias"], kl=torch.linspace(-0.2, 0.6, n))
    call = lambda h, w, b: module(h, w, data["target"], b, **extra)  # noqa: E731
    calls = []
    real = engine.eager_gradients
    monkeypatch.setattr(engine, "eager_gradients", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setitem(prefkern.fused.eager.EAGER_TOKENS_PER_CHUNK, "cpu", T * examples_per_chunk)
    eager = run(call, data, grad_scale=0.6)
    assert calls, "the eager path was not taken"
    monkeypatch.setattr(engine, "wants_gradient", lambda *a: False)
    stream = run(call, data, grad_scale=0.6)
    assert len(calls) == 1
    compare(eager, stream)


def test_eager_raises_input_errors_before_any_gemm(monkeypatch):
    """A completion with no scored token under length averaging is refused by the dry run."""
    data = make_batch()
    data["target"][1] = IGNORE
    import prefkern.fused.engine as engine

    monkeypatch.setattr(engine, "eager_gradients", lambda *a, **k: pytest.fail("GEMMs ran before the check"))
    with pytest.raises(ValueError, match=r"target rows \[1\] have no scored token"):
        run(paired(ours.LigerFusedLinearSimPOLoss(), data), data)


def test_kto_against_materialised_logits():
    n = KTO_LABELS.numel()
    data = make_batch(rows=n, seed=10)
    kl = torch.linspace(-0.2, 0.6, n)

    def plain(h, w, b):
        logits, tok, mask = materialised(h, w, b, data["target"])
        with torch.no_grad():
            ref = materialised(data["ref_hidden"], data["ref_weight"], data["ref_bias"], data["target"])[1].sum(-1)
        r = tok.sum(-1) - ref
        s = KTO_LABELS.float() * 2 - 1
        loss = (1 - torch.sigmoid(0.3 * (r - kl) * s)).mean()
        lab = KTO_LABELS
        aux = (tok.sum(-1)[lab].sum(), tok.sum(-1)[~lab].sum(), logits[lab].sum(), logits[~lab].sum(),
               0.3 * r[lab].sum(), 0.3 * r[~lab].sum())
        return loss, tuple(x.detach() for x in aux)

    module = ours.LigerFusedLinearKTOLoss(beta=0.3, use_ref_model=True)
    got = run(lambda h, w, b: module(h, w, data["target"], b, KTO_LABELS, data["ref_hidden"], data["ref_weight"],
                                     data["ref_bias"], kl), data)
    compare(got, run(plain, data))


def test_dpo_agrees_with_fused_linear_preference_loss():
    from prefkern import FusedLinearPreferenceLoss

    data = make_batch(seed=14)
    args = (data["hidden"], data["weight"], data["target"], data["bias"])
    ref = dict(ref_hidden=data["ref_hidden"], ref_weight=data["ref_weight"], ref_bias=data["ref_bias"])
    core = FusedLinearPreferenceLoss("sigmoid", beta=0.3, nll_weight=0.5, mode="stream")(*args, **ref)
    loss, aux = ours.LigerFusedLinearDPOLoss(beta=0.3, alpha=0.5, compute_nll_loss=True)(
        data["weight"], data["hidden"], data["target"], data["bias"], data["ref_hidden"], data["ref_weight"],
        data["ref_bias"])
    assert_close(loss, core.loss, "loss")
    assert_close(aux[5], core.chosen_rewards, "chosen_rewards")
    assert_close(aux[6], core.rejected_rewards, "rejected_rewards")
    assert_close(aux[4], core.metrics["nll_loss"], "nll_loss")


def test_logits_means_bf16_close_to_fp64():
    data = make_batch(seed=11)
    h, w, b = (data[k].to(torch.bfloat16) for k in ("hidden", "weight", "bias"))
    _, aux = ours.LigerFusedLinearCPOLoss()(w, h, data["target"], b)
    logits = h.double() @ w.double().t() + b.double()
    torch.testing.assert_close(aux[2].double(), logits[:B].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux[3].double(), logits[B:].mean(), rtol=1e-5, atol=1e-6)


def test_no_grad():
    data = make_batch(seed=12)
    module = ours.LigerFusedLinearDPOLoss(use_ref_model=True)
    with torch.no_grad():
        loss, aux = module(data["weight"], data["hidden"], data["target"], data["bias"], ref_input=data["ref_hidden"])
    assert not loss.requires_grad and len(aux) == 7 and torch.isfinite(loss)


def test_frozen_head_reference_defaults_to_policy_head():
    data = make_batch(seed=12)
    module = ours.LigerFusedLinearDPOLoss(use_ref_model=True)
    hidden = data["hidden"].clone().requires_grad_()
    # ref_weight=None: the policy's (detached) head scores the reference input; only hidden needs a gradient.
    loss, aux = module(data["weight"], hidden, data["target"], data["bias"], ref_input=data["ref_hidden"])
    explicit, _ = module(data["weight"], data["hidden"], data["target"], data["bias"], ref_input=data["ref_hidden"],
                         ref_weight=data["weight"], ref_bias=data["bias"])
    assert_close(loss.detach(), explicit, "loss")
    loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


# ---- argument errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, exc, name", [
    (lambda: ours.LigerFusedLinearDPOLoss(loss_type="ipo"), ValueError, "loss_type"),
    (lambda: ours.LigerFusedLinearDPOLoss(loss_type="exo_pair"), ValueError, "label_smoothing"),
    (lambda: ours.LigerFusedLinearDPOLoss(loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing"),
    (lambda: ours.LigerFusedLinearDPOLoss(beta="0.1"), TypeError, "beta"),
    (lambda: ours.LigerFusedLinearORPOLoss(chunk_size=0), ValueError, "chunk_size"),
    (lambda: ours.LigerFusedLinearCPOLoss(compiled=1), TypeError, "compiled"),
    (lambda: ours.LigerFusedLinearSimPOLoss(beta=0.0), ValueError, "beta"),
    (lambda: ours.LigerFusedLinearSimPOLoss(label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda: ours.LigerFusedLinearDPOLoss(discopop_tau=0.0), ValueError, "discopop_tau"),
    (lambda: ours.LigerFusedLinearDPOLoss(use_ref_model=None), TypeError, "use_ref_model"),
    (lambda: ours.LigerFusedLinearKTOLoss(ignore_index=1.5), TypeError, "ignore_index"),
])
def test_constructor_errors(make, exc, name):
    with pytest.raises(exc, match=name):
        make()


def test_forward_errors():
    data = make_batch(seed=13)
    w, h, y, b = data["weight"], data["hidden"], data["target"], data["bias"]
    dpo = ours.LigerFusedLinearDPOLoss()
    with pytest.raises(ValueError, match="ref_input"):
        dpo(w, h, y, b)
    with pytest.raises(ValueError, match="_input"):
        ours.LigerFusedLinearCPOLoss()(w, h[:3], y[:3], b)
    with pytest.raises(ValueError, match="target"):
        ours.LigerFusedLinearCPOLoss()(w, h, y[:, :-1], b)
    with pytest.raises(ValueError, match="lin_weight"):
        ours.LigerFusedLinearCPOLoss()(w[:, :-1], h, y, b)
    with pytest.raises(TypeError, match="bias"):
        ours.LigerFusedLinearCPOLoss()(w, h, y, b.double())
    with pytest.raises(ValueError, match="nll_target"):
        ours.LigerFusedLinearORPOLoss()(w, h, y, b, nll_target=y[:B])
    empty = y.clone()
    empty[0] = IGNORE
    with pytest.raises(ValueError, match=r"target rows \[0\]"):
        ours.LigerFusedLinearSimPOLoss()(w, h, empty, b)
    with pytest.raises(ValueError, match="target rows"):
        ours.LigerFusedLinearDPOLoss(average_log_prob=True, use_ref_model=False)(w, h, empty, b)
    loss, _ = ours.LigerFusedLinearDPOLoss(use_ref_model=False)(w, h, empty, b)  # sums: an empty row scores 0
    assert torch.isfinite(loss)
    kto = ours.LigerFusedLinearKTOLoss()
    with pytest.raises(ValueError, match="preference_labels"):
        kto(h, w, y, b)
    with pytest.raises(ValueError, match="preference_labels"):
        kto(h, w, y, b, preference_labels=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="kl"):
        kto(h, w, y, b, preference_labels=torch.ones(2 * B, dtype=torch.bool), kl=torch.zeros(3))


def test_package_never_imports_liger():
    root = pathlib.Path(ours.__file__).resolve().parents[1]
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "liger_kernel" for n in names), f"{path} imports liger_kernel"


@pytest.mark.parametrize("kl", [float("nan"), float("inf"), torch.tensor(float("nan")), torch.tensor([0.1, float("inf")])])
def test_kto_rejects_a_non_finite_kl(kl):
    data = make_batch(rows=2, seed=21)
    module = ours.LigerFusedLinearKTOLoss()
    with pytest.raises(ValueError, match="kl"):
        module(data["hidden"], data["weight"], data["target"], data["bias"],
               preference_labels=torch.tensor([True, False]), kl=kl)
