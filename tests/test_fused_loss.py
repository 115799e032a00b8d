"""FusedLinearPreferenceLoss against the catalog on materialised logits (the plain-torch reference)."""

import pytest
import torch

import prefkern
from prefkern import reference
from prefkern.fused_loss import EAGER_LOSS_TYPES
from prefkern.losses import preference_batch

B, T, H, V = 3, 47, 31, 123
OPTIONS = {"robust": {"label_smoothing": 0.1}, "cdpo": {"label_smoothing": 0.1}, "exo_pair": {"label_smoothing": 1e-3}}
STREAM_ONLY = ["aot", "aot_unpaired", "bco_pair"]
UNPAIRED = {"kto", "apo_zero_unpaired"}  # tested on their own below
REFERENCE_FREE = {"simpo", "simpo_hinge", "orpo", "cpo", "cpo_hinge", "cpo_ipo", "cpo_simpo", "alphapo", "slic_hf", "sft"}


def inputs(dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.2).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    ref_hidden = (hidden.float() + 0.1 * torch.randn(2 * B, T, H, generator=g)).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :5] = -100  # prompt
    labels[1, 40:] = -100  # padding
    return hidden, weight, b, ref_hidden, labels


def materialised(loss_type, hidden, weight, bias, ref_hidden, labels, **kw):
    """The same loss from the catalog on log-probs of fully materialised logits."""
    mask = labels != -100
    tok = reference.linear_logprobs(hidden.reshape(-1, H), weight, labels.reshape(-1), bias).reshape(2 * B, T)
    with torch.no_grad():
        ref_tok = reference.linear_logprobs(ref_hidden.reshape(-1, H), weight, labels.reshape(-1), bias).reshape(2 * B, T)
    batch = preference_batch(tok, mask, None if loss_type in REFERENCE_FREE else ref_tok)
    name = loss_type
    if loss_type == "rpo":
        name, kw = ["sigmoid", "sft"], {**kw, "loss_weights": [1.0, 1.0]}
    return prefkern.preference_loss(name, batch=batch, **kw)


def grads(out, *params):
    for p in params:
        p.grad = None
    out.loss.backward()
    return [None if p is None else p.grad.clone() for p in params]


def assert_same_output(out, our_grads, expect, their_grads):
    """Loss, per-example losses, rewards, metrics and the (hidden, weight, bias) gradients, fp32 tolerances."""
    torch.testing.assert_close(out.loss, expect.loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.losses, expect.losses, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.chosen_rewards, expect.chosen_rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.rejected_rewards, expect.rejected_rewards, atol=1e-5, rtol=1e-5)
    assert out.metrics.keys() == expect.metrics.keys()
    for k in expect.metrics:
        torch.testing.assert_close(out.metrics[k], expect.metrics[k], atol=1e-5, rtol=1e-4, msg=k)
    for name, a, e in zip(("hidden", "weight", "bias"), our_grads, their_grads):
        torch.testing.assert_close(a, e, atol=1e-5 * e.abs().max().item() + 1e-7, rtol=1e-4, msg=name)


def leaves(*ts):
    return [None if t is None else t.clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("loss_type", sorted(EAGER_LOSS_TYPES - UNPAIRED) + STREAM_ONLY)
@pytest.mark.parametrize("mode", ["stream", "eager"])
def test_matches_materialised_reference(loss_type, mode):
    if mode == "eager" and loss_type in STREAM_ONLY:
        pytest.skip("streams by design")
    hidden, weight, bias, ref_hidden, labels = inputs()
    kw = OPTIONS.get(loss_type, {})
    x, w, b = leaves(hidden, weight, bias)
    # a budget of one pair of logits forces one-pair chunks in eager mode
    module = prefkern.FusedLinearPreferenceLoss(loss_type, mode=mode, memory_budget=2 * T * V * 4, **kw)
    out = module(x, w, labels, b, ref_hidden=None if loss_type in REFERENCE_FREE else ref_hidden)
    ours = grads(out, x, w, b)
    x2, w2, b2 = leaves(hidden, weight, bias)
    expect = materialised(loss_type, x2, w2, b2, ref_hidden, labels, **kw)
    assert_same_output(out, ours, expect, grads(expect, x2, w2, b2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    hidden, weight, bias, ref_hidden, labels = inputs(dtype)
    x, w, b = leaves(hidden, weight, bias)
    out = prefkern.FusedLinearPreferenceLoss("sigmoid", mode="eager")(x, w, labels, b, ref_hidden=ref_hidden)
    ours = grads(out, x, w, b)
    x64, w64, b64 = leaves(hidden.double(), weight.double(), bias.double())
    mask = labels != -100
    tok = reference.linear_logprobs(x64.reshape(-1, H), w64, labels.reshape(-1), b64, compute_dtype=torch.float64).reshape(2 * B, T)
    ref_tok = reference.linear_logprobs(ref_hidden.double().reshape(-1, H), weight.double(), labels.reshape(-1), bias.double(),
                                        compute_dtype=torch.float64).reshape(2 * B, T)
    exact = prefkern.preference_loss("sigmoid", batch=preference_batch(tok, mask, ref_tok))
    truth = grads(exact, x64, w64, b64)
    assert abs(out.loss.item() - exact.loss.item()) < 1e-4
    for a, e in zip(ours, truth):
        assert a.dtype == dtype
        # the gradient is computed in fp32 and rounded once to the storage dtype
        torch.testing.assert_close(a.double(), e, atol=2e-3, rtol=1e-2)


def test_precomputed_reference_logps_match_reference_model():
    hidden, weight, bias, ref_hidden, labels = inputs()
    module = prefkern.FusedLinearPreferenceLoss("sigmoid")
    with_model = module(hidden, weight, labels, bias, ref_hidden=ref_hidden)
    mask = labels != -100
    ref_tok = prefkern.linear_logprobs(ref_hidden, weight, labels, bias)
    per_seq = (ref_tok * mask).sum(-1)
    for ref in (per_seq, ref_tok, (per_seq[:B], per_seq[B:])):
        out = module(hidden, weight, labels, bias, ref_logps=ref)
        torch.testing.assert_close(out.loss, with_model.loss)


def test_frozen_weight_gets_no_gradient_work():
    hidden, weight, bias, ref_hidden, labels = inputs()
    for mode in ("stream", "eager"):
        x = hidden.clone().requires_grad_()
        out = prefkern.FusedLinearPreferenceLoss("sigmoid", mode=mode)(x, weight, labels, bias, ref_hidden=ref_hidden)
        out.loss.backward()
        assert x.grad is not None and weight.grad is None


def test_shift_one_equals_pre_shifted_labels():
    hidden, weight, bias, ref_hidden, labels = inputs()
    module = prefkern.FusedLinearPreferenceLoss("sigmoid", shift=1)
    ids = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    a = module(hidden, weight, ids, bias, ref_hidden=ref_hidden)
    shifted = torch.cat([ids[:, 1:], torch.full((2 * B, 1), -100)], dim=1)
    b = prefkern.FusedLinearPreferenceLoss("sigmoid")(hidden, weight, shifted, bias, ref_hidden=ref_hidden)
    torch.testing.assert_close(a.loss, b.loss)


def test_fully_masked_sequence():
    hidden, weight, bias, ref_hidden, labels = inputs()
    labels[B] = -100  # the first rejected completion is empty
    with pytest.raises(ValueError, match="empty chosen or rejected completion"):
        prefkern.FusedLinearPreferenceLoss("sigmoid")(hidden, weight, labels, bias, ref_hidden=ref_hidden)
    dropped = prefkern.FusedLinearPreferenceLoss("sigmoid", empty_completions="drop")(hidden, weight, labels, bias, ref_hidden=ref_hidden)
    assert dropped.losses.shape == (B - 1,) and torch.isfinite(dropped.loss)
    for mode in ("stream", "eager"):
        x = hidden.clone().requires_grad_()
        kept = prefkern.FusedLinearPreferenceLoss("sigmoid", mode=mode, empty_completions="keep")(x, weight, labels, bias, ref_hidden=ref_hidden)
        kept.loss.backward()
        assert torch.isfinite(kept.loss) and torch.all(x.grad[B] == 0)


@pytest.mark.parametrize("loss_type", sorted(UNPAIRED))
@pytest.mark.parametrize("mode", ["stream", "eager"])
@pytest.mark.parametrize("int_labels", [False, True])
def test_kto_through_the_fused_module(loss_type, mode, int_labels):
    """KTO (with a mismatched KL batch) and APO-zero unpaired, eager in one-example chunks or streamed,
    against the catalog on materialised logits: loss, per-example losses, metrics and every gradient."""
    hidden, weight, bias, ref_hidden, labels = inputs()
    kto_labels = torch.tensor([True, False, True, True, False, False])
    if int_labels:
        kto_labels = kto_labels.long()
    kl_hidden, kl_ref = hidden.roll(1, 0), ref_hidden.roll(1, 0)
    x, w, b = leaves(hidden, weight, bias)
    module = prefkern.FusedLinearPreferenceLoss(loss_type, mode=mode, memory_budget=T * V * 4)
    out = module(x, w, labels, b, ref_hidden=ref_hidden, desirable=kto_labels, kl_hidden=kl_hidden, kl_labels=labels,
                 ref_kl_hidden=kl_ref)
    ours = grads(out, x, w, b)
    mask = labels != -100

    def seq(hh, ww, bb):
        return (reference.linear_logprobs(hh.reshape(-1, H), ww, labels.reshape(-1), bb).reshape(2 * B, T) * mask).sum(-1)

    x2, w2, b2 = leaves(hidden, weight, bias)
    kl = {}
    if loss_type == "kto":
        kl = dict(kl_policy_logps=seq(kl_hidden, weight, bias).detach(), kl_ref_logps=seq(kl_ref, weight, bias))
    expect = prefkern.preference_loss(loss_type, policy_logps=seq(x2, w2, b2), ref_logps=seq(ref_hidden, weight, bias),
                                      desirable=kto_labels, **kl)
    assert_same_output(out, ours, expect, grads(expect, x2, w2, b2))


def test_kto_eager_raises_input_errors_before_any_gemm(monkeypatch):
    import prefkern.fused.engine as engine

    hidden, weight, bias, ref_hidden, labels = inputs()
    monkeypatch.setattr(engine, "eager_gradients", lambda *a, **k: pytest.fail("GEMMs ran before the check"))
    module = prefkern.FusedLinearPreferenceLoss("kto", mode="eager")
    with pytest.raises(ValueError, match="kl_policy_logps"):
        module(hidden.clone().requires_grad_(), weight, labels, bias, ref_hidden=ref_hidden,
               desirable=torch.ones(2 * B, dtype=torch.bool))


def test_salt_token_weights():
    hidden, weight, bias, _, labels = inputs()
    weights = torch.where(torch.rand(2 * B, T) > 0.3, 1.0, -1.0)
    x = hidden.clone().requires_grad_()
    out = prefkern.FusedLinearPreferenceLoss("salt")(x, weight, labels, bias, token_weights=weights)
    out.loss.backward()
    x2 = hidden.clone().requires_grad_()
    tok = reference.linear_logprobs(x2.reshape(-1, H), weight, labels.reshape(-1), bias).reshape(2 * B, T)
    w = weights * (labels != -100)
    expect = prefkern.salt_loss(tok[:B], w[:B], tok[B:], w[B:], vocab_size=V)
    expect.loss.backward()
    torch.testing.assert_close(out.loss, expect.loss)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-4)


def test_bad_configuration_and_inputs():
    hidden, weight, bias, ref_hidden, labels = inputs()
    with pytest.raises(ValueError, match="not in the catalog"):
        prefkern.FusedLinearPreferenceLoss("dpo_plus")
    with pytest.raises(ValueError, match="needs a loss that decomposes per pair"):
        prefkern.FusedLinearPreferenceLoss("aot", mode="eager")
    with pytest.raises(ValueError, match="needs reference log-probs"):
        prefkern.FusedLinearPreferenceLoss("sigmoid")(hidden, weight, labels, bias)
    with pytest.raises(ValueError, match=r"hidden must have shape \[2B, T, H\]"):
        prefkern.FusedLinearPreferenceLoss("simpo")(hidden[0], weight, labels, bias)
    with pytest.raises(ValueError, match="not both"):
        prefkern.FusedLinearPreferenceLoss("sigmoid")(hidden, weight, labels, bias, ref_hidden=ref_hidden,
                                                      ref_logps=torch.zeros(2 * B))
    with pytest.raises(ValueError, match="not split across eager chunks"):
        prefkern.FusedLinearPreferenceLoss("sigmoid", mode="eager", chosen_weights=torch.ones(B))
    with pytest.raises(ValueError, match="labels must lie in"):
        prefkern.FusedLinearPreferenceLoss("sigmoid", mode="eager")(hidden.requires_grad_(), weight, labels.clamp(min=0) + V,
                                                                    bias, ref_logps=torch.zeros(2 * B))
    with pytest.raises(ValueError, match=r"ref_logps must have shape \[2B\]"):
        prefkern.FusedLinearPreferenceLoss("sigmoid")(hidden, weight, labels, bias, ref_logps=torch.zeros(5))


def test_torch_compile_module():
    hidden, weight, bias, ref_hidden, labels = inputs()
    module = prefkern.FusedLinearPreferenceLoss("sigmoid", mode="stream")
    compiled = torch.compile(module)
    x1, x2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    a = compiled(x1, weight, labels, bias, ref_hidden=ref_hidden)
    b = module(x2, weight, labels, bias, ref_hidden=ref_hidden)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_eager_loss_backpropagates_once():
    """The eager gradients are computed in forward and scaled in place by backward: a second backward
    would scale them again, so it raises instead of returning wrong gradients."""
    hidden, weight, bias, ref_hidden, labels = inputs()
    x = hidden.clone().requires_grad_()
    out = prefkern.FusedLinearPreferenceLoss("sigmoid", mode="eager")(x, weight, labels, bias, ref_hidden=ref_hidden)
    (2 * out.loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated already"):
        out.loss.backward()
