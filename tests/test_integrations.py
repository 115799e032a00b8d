"""prefkern.integrations: the Hugging Face helpers live outside the core, stay importable from prefkern,
and draw their randomness from their own torch.Generator (the global RNG is neither seeded nor read)."""

import ast
import pathlib

import pytest
import torch

import prefkern
import prefkern.integrations.hf as hf

PACKAGE = pathlib.Path(prefkern.__file__).parent


def test_names_are_reexported_from_prefkern():
    assert prefkern.BestOfN is hf.BestOfN
    assert prefkern.BestOfNResult is hf.BestOfNResult
    assert prefkern.RewardEnsemble is hf.RewardEnsemble
    assert prefkern.ensemble_head is prefkern.ensemble.ensemble_head
    for name in ("ensemble_head", "BestOfN", "RewardEnsemble", "best_of_n", "sample"):
        assert name in prefkern.__all__


def test_core_modules_never_import_integrations():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "integrations" or rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("integrations" in n for n in names), f"{rel} imports the integrations"


transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("abcdefgh ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=11, n_positions=64,
                                  bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def reward(prompts, completions):
    return torch.tensor([c.count("a") + 0.1 * len(c) for c in completions], dtype=torch.float32)


@pytest.mark.parametrize("sampler", ["hf", "prefkern"])
def test_generation_never_touches_the_global_rng(sampler):
    tok, model = tiny_tokenizer(), tiny_gpt2()
    kw = {"max_new_tokens": 6, "top_k": 5}

    def run(seed):
        return prefkern.BestOfN(model, tok, reward, n=3, k=2, method="rso", generation_kwargs=kw, sampler=sampler,
                                seed=seed)

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    bon = run(7)
    first = bon.generate(["ab", "c"])
    second = bon.generate(["ab", "c"])
    assert torch.equal(torch.get_rng_state(), before), "the global RNG was seeded or advanced"
    again = run(7)
    assert again.generate(["ab", "c"]).completions == first.completions
    assert again.generate(["ab", "c"]).completions == second.completions
    torch.manual_seed(99)  # another global state changes nothing
    assert run(7).generate(["ab", "c"]).completions == first.completions
    other = [run(s).generate(["ab", "c"]).completions for s in (8, 9, 10)]
    assert any(o != first.completions for o in other), "different seeds give different candidates"


def test_hf_sampler_draws_with_prefkern_sample():
    """top_k=1 makes the seeded processor greedy: the HF sampler then equals HF's greedy decoding."""
    tok, model = tiny_tokenizer(), tiny_gpt2()
    bon = prefkern.BestOfN(model, tok, reward, n=2, sampler="hf", generation_kwargs={"max_new_tokens": 6, "top_k": 1},
                           seed=0)
    res = bon.generate(["abc"])
    enc = tok(["abc"], return_tensors="pt")
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=0)[0, 3:].tolist()
    if 1 in greedy:
        greedy = greedy[:greedy.index(1)]
    assert res.completions[0] == [tok.decode(greedy)] * 2


def test_seed_must_fit_int64():
    tok, model = tiny_tokenizer(), tiny_gpt2()
    with pytest.raises(ValueError, match="seed must be <="):
        prefkern.BestOfN(model, tok, reward, seed=2**63)
    with pytest.raises(TypeError, match="seed must be an int"):
        prefkern.BestOfN(model, tok, reward, seed=1.5)
