"""Best-of-n selection (argmax, RAFT top-k, RSO) and the BestOfN end-to-end helper with tiny random models."""

import json
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import prefkern
from prefkern import reference


# ---- selection: LOSSES.md section J vectors -------------------------------------------------------------

@pytest.mark.parametrize("n,expect", [(1, 0.0), (2, 0.193147), (4, 0.636294), (16, 1.83509), (64, 3.17451),
                                      (1024, 5.93245), (12500, 8.43356)])
def test_kl_bound_vectors(n, expect):
    sel = prefkern.best_of_n(torch.zeros(2, n))
    assert abs(sel.kl_bound - expect) < 5e-6


def test_raft_vectors():
    local = torch.tensor([[0.2, 0.9, 0.5, 0.1], [1.5, -0.3, 1.4, 0.0], [-1.0, -2.0, -0.5, -3.0]])
    sel = prefkern.best_of_n(local, method="argmax")
    assert sel.local.squeeze(1).tolist() == [1, 0, 2]
    assert sel.indices.squeeze(1).tolist() == [1, 4, 10]
    assert torch.equal(sel.scores.squeeze(1), torch.tensor([0.9, 1.5, -0.5]))
    top = torch.tensor([0.3, 2.0, -1.0, 1.1])  # RAFT top mode: global ranking, alpha = 0.5
    kept = prefkern.best_of_n(top, n=4, k=int(4 * 0.5), method="topk")
    assert kept.indices.tolist() == [[1, 3]]


def test_rso_vector_and_first_pass_probabilities():
    rewards = torch.tensor([[1.0, 0.5, 0.0, -1.0]])
    u = torch.tensor([[[0.7, 0.5, 0.1, 0.9], [0.99, 0.99, 0.99, 0.99]]])
    sel = prefkern.best_of_n(rewards, k=2, method="rso", beta=0.5, uniforms=u)
    assert sel.local.tolist() == [[0, 2]]
    assert reference.rso_select([1.0, 0.5, 0.0, -1.0], 2, 0.5, u[0].tolist()) == [0, 2]
    probs = torch.exp((rewards - rewards.max()) / 0.5)
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0.367879, 0.135335, 0.0183156]]), atol=1e-6, rtol=0)


# ---- selection against the loop references ------------------------------------------------------------

def random_scores(p, n, ties=True, nan=False):
    s = torch.randint(-3, 4, (p, n)).float() if ties else torch.randn(p, n)
    if nan:
        s[::3, 1] = float("nan")
    return s


@pytest.mark.parametrize("n,k", [(1, 1), (4, 1), (8, 3), (13, 13)])
@pytest.mark.parametrize("nan", [False, True])
def test_argmax_and_topk_against_reference(n, k, nan):
    s = random_scores(50, n, nan=nan and n > 1)
    expect = reference.best_of_n_select(s, k)
    sel = prefkern.best_of_n(s, method="topk", k=k)
    assert torch.equal(sel.local, expect)
    assert torch.equal(sel.indices, expect + torch.arange(50).unsqueeze(1) * n)
    torch.testing.assert_close(sel.scores, s.gather(1, expect), equal_nan=True)
    assert torch.equal(sel.valid, torch.isfinite(s.gather(1, expect)))
    if k == 1:
        assert torch.equal(prefkern.best_of_n(s).local, expect)
        flat = prefkern.best_of_n(s.reshape(-1), n=n)
        assert torch.equal(flat.indices, sel.indices)


@pytest.mark.parametrize("beta", [0.0, 0.05, 0.5, 5.0])
@pytest.mark.parametrize("ties", [False, True])
def test_rso_against_algorithm_1(beta, ties):
    p, n, k = 40, 7, 3
    s = random_scores(p, n, ties=ties)
    g = torch.Generator().manual_seed(1)
    u = torch.rand(p, k, n, generator=g)
    sel = prefkern.best_of_n(s, k=k, method="rso", beta=beta, uniforms=u)
    for i in range(p):
        assert sel.local[i].tolist() == reference.rso_select(s[i].tolist(), k, beta, u[i].tolist())
    assert bool((sel.local.sort(dim=-1).values.diff(dim=-1) > 0).all()), "accepted candidates are distinct"


def test_rso_acceptance_statistics():
    """num_samples = 1: candidate i is taken with probability q_i * prod_{j<i} (1 - q_j) in the first pass."""
    rewards = torch.tensor([-1.0, 0.5, 0.0, 1.0])
    beta, p = 0.5, 200_000
    q = torch.exp((rewards - rewards.max()) / beta).double()
    expect = torch.stack([q[i] * torch.prod(1 - q[:i]) for i in range(4)])
    sel = prefkern.best_of_n(rewards.expand(p, 4), k=1, method="rso", beta=beta, seed=2024)
    freq = torch.bincount(sel.local.squeeze(1), minlength=4).double() / p
    assert bool(((freq - expect).abs() <= 5 * (expect * (1 - expect) / p).sqrt() + 1e-4).all()), (freq, expect)
    # beta -> 0 is top-k over N; the same seed replays the same acceptances
    assert torch.equal(prefkern.best_of_n(rewards[None], k=2, method="rso", beta=0.0, seed=1).local, torch.tensor([[3, 1]]))
    s = random_scores(30, 6)
    a = prefkern.best_of_n(s, k=2, method="rso", seed=5)
    assert torch.equal(a.local, prefkern.best_of_n(s, k=2, method="rso", seed=5).local)
    assert not torch.equal(a.local, prefkern.best_of_n(s, k=2, method="rso", seed=6).local)


@pytest.mark.parametrize("method,k", [("argmax", 1), ("topk", 2), ("rso", 2)])
def test_no_host_sync(method, k):
    """Under FakeTensorMode any data-dependent step (.item(), nonzero, tolist) raises."""
    with FakeTensorMode():
        s = torch.empty(16, 5)
        sel = prefkern.best_of_n(s, k=k, method=method, seed=torch.tensor([3]))
        assert sel.indices.shape == (16, k) and sel.scores.shape == (16, k)


def test_selection_errors():
    s = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, n\] = \[1, 3\]"):
        prefkern.best_of_n(s, k=4, method="topk")
    with pytest.raises(ValueError, match="method must be one of"):
        prefkern.best_of_n(s, method="best")
    with pytest.raises(ValueError, match="use k=1 or method='topk'"):
        prefkern.best_of_n(s, k=2)
    with pytest.raises(ValueError, match="flat scores"):
        prefkern.best_of_n(s.reshape(-1))
    with pytest.raises(ValueError, match="not a multiple of n = 5"):
        prefkern.best_of_n(s.reshape(-1), n=5)
    with pytest.raises(TypeError, match="scores must be a floating-point tensor"):
        prefkern.best_of_n(s.long())
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        prefkern.best_of_n(s, k=1, method="rso", beta=-1.0)
    with pytest.raises(ValueError, match=r"uniforms must have shape \[P, k, n\]"):
        prefkern.best_of_n(s, k=1, method="rso", uniforms=torch.rand(4, 2, 3))


# ---- BestOfN end to end --------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CHARS = list("abcdefgh ")


def tiny_tokenizer():
    """A character-level tokenizer built in the test: no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_gpt2(vocab=len(CHARS) + 2):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64,
                                  bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def count_a_reward(prompts, completions):
    """Three 'members' that each like the letter a, with member-specific offsets: [K=3, N]."""
    base = torch.tensor([c.count("a") + 0.1 * len(c) for c in completions], dtype=torch.float32)
    return torch.stack([base, base + 1.0, base - 0.5])


def test_tokenizer_roundtrip():
    tok = tiny_tokenizer()
    ids = tok(["abc", "h a"])["input_ids"]
    assert ids[0] == [2, 3, 4]
    assert tok.decode(ids[1]) == "h a"


@pytest.mark.parametrize("sampler", ["hf", "prefkern"])
def test_best_of_n_end_to_end(sampler, tmp_path):
    tok = tiny_tokenizer()
    model = tiny_gpt2()
    bon = prefkern.BestOfN(model, tok, count_a_reward, n=6, generation_kwargs={"max_new_tokens": 8, "top_k": 6},
                           sampler=sampler, seed=11)
    res = bon.generate(["ab", "hhh a", "c"])
    assert res.scores.shape == (3, 6) and res.member_scores.shape == (3, 18)
    torch.testing.assert_close(res.scores.reshape(-1), res.member_scores.mean(0))
    for i in range(3):
        comps = res.completions[i]
        assert len(comps) == 6
        expect = torch.tensor([c.count("a") + 0.1 * len(c) + 1 / 6 for c in comps]).float()
        torch.testing.assert_close(res.scores[i], expect)
        best = int(res.selection.local[i, 0])
        assert res.best[i][0] == comps[best]
        assert res.scores[i, best] == res.scores[i].max()
        assert best == int(torch.nonzero(res.scores[i] == res.scores[i].max())[0, 0])  # lowest index on ties
    assert abs(res.selection.kl_bound - (math.log(6) - 5 / 6)) < 1e-12
    pairs = res.preference_pairs()
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    path = tmp_path / "pairs.jsonl"
    assert res.write_preference_pairs(str(path)) == len(pairs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["prompt"] in ("ab", "hhh a", "c") and set(rows[0]) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
    again = prefkern.BestOfN(model, tok, count_a_reward, n=6, generation_kwargs={"max_new_tokens": 8, "top_k": 6},
                             sampler=sampler, seed=11).generate(["ab", "hhh a", "c"])
    assert again.completions == res.completions, "the same seed gives the same completions"


def test_prefkern_sampler_respects_top_k_and_eos():
    """top_k=1 makes the decode loop greedy: it must equal HF's greedy decoding."""
    tok = tiny_tokenizer()
    model = tiny_gpt2()
    bon = prefkern.BestOfN(model, tok, lambda p, c: torch.zeros(len(c)), n=2, sampler="prefkern",
                           generation_kwargs={"max_new_tokens": 6, "top_k": 1}, seed=0)
    res = bon.generate(["abc"])
    enc = tok(["abc"], return_tensors="pt")
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=0)[0, 3:].tolist()
    if 1 in greedy:
        greedy = greedy[:greedy.index(1)]
    assert res.completions[0][0] == res.completions[0][1] == tok.decode(greedy)


def test_ids_reward_step_fn_rso_and_custom_reduce():
    """A user step function over a fixed bigram table, a reward on token ids, RSO selection, WCO-style reduce."""
    v = 12
    table = torch.randn(v, v) * 2

    def step_fn(input_ids, attention_mask, state):
        return table[input_ids[:, -1]], state

    def reward(ids, mask):
        return torch.stack([(ids == 3).float().sum(-1), (ids == 5).float().sum(-1)])

    class Stub:  # no tokenizer, no HF model: only the step function
        config = None

    bon = prefkern.BestOfN(Stub(), None, reward, n=5, k=2, method="rso", beta=0.5, reward_inputs="ids",
                           sampler="prefkern", step_fn=step_fn, reduce=lambda s: s.min(dim=0).values,
                           generation_kwargs={"max_new_tokens": 7, "temperature": 0.9}, seed=3)
    res = bon.generate([[1, 2], [4]])
    assert res.completion_ids.shape == (10, 7)
    ids = res.completion_ids
    # the prompts hold no 3 or 5: the reduced reward is min(#3, #5) over the completion alone
    expect = torch.minimum((ids == 3).float().sum(-1), (ids == 5).float().sum(-1))
    torch.testing.assert_close(res.scores.reshape(-1), expect)
    assert res.selection.local.shape == (2, 2)
    assert res.completions[0][0] == ids[0].tolist()


def test_best_of_n_helper_errors():
    tok, model = tiny_tokenizer(), tiny_gpt2()
    with pytest.raises(TypeError, match="reward must be callable"):
        prefkern.BestOfN(model, tok, 3.0)
    with pytest.raises(ValueError, match="n must be a positive int"):
        prefkern.BestOfN(model, tok, count_a_reward, n=0)
    with pytest.raises(ValueError, match="reward_inputs='text' needs a tokenizer"):
        prefkern.BestOfN(model, None, count_a_reward)
    bad = prefkern.BestOfN(model, tok, lambda p, c: torch.zeros(3), n=2, generation_kwargs={"max_new_tokens": 2})
    with pytest.raises(ValueError, match=r"reward must return scores of shape \[N\] or \[K, N\] with N = 4"):
        bad.generate(["a", "b"])


def test_best_of_n_with_reward_ensemble_of_hf_models():
    """A RewardEnsemble of K tiny sequence-classification models scores the candidates (WCO)."""
    tok = tiny_tokenizer()
    vocab = len(CHARS) + 2
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab, n_positions=64, num_labels=1,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=1)
    members = []
    for seed in range(3):
        torch.manual_seed(200 + seed)
        members.append(transformers.GPT2ForSequenceClassification(cfg).eval())
    ensemble = prefkern.RewardEnsemble(members, method="wco")
    bon = prefkern.BestOfN(tiny_gpt2(), tok, ensemble, n=4, reward_inputs="ids",
                           generation_kwargs={"max_new_tokens": 5}, sampler="prefkern", seed=3)
    res = bon.generate(["ab", "c"])
    assert res.scores.shape == (2, 4) and res.member_scores.shape == (3, 8)
    torch.testing.assert_close(res.scores.reshape(-1), res.member_scores.min(0).values)
    for i in range(2):
        assert res.scores[i, int(res.selection.local[i, 0])] == res.scores[i].max()
