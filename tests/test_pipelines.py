"""fastsolar.pipeline("text-generation", ...) against transformers' pipeline on the same tiny checkpoint (the real
SOLAR tokenizer.model and chat template): the same generated_text, greedy, for a string, a list of strings, a
conversation and a list of conversations, with return_full_text either way."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from hf_fixtures import build_hf_model, real_tokenizer_path, save

import fastsolar
from fastsolar import Solar, Tokenizer
from fastsolar.text.chat import SOLAR_CHAT_TEMPLATE

GREEDY = dict(do_sample=False, max_new_tokens=9)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Depth Up-Scaling?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok_path = real_tokenizer_path()
    hf = build_hf_model(vocab_size=32000, num_hidden_layers=2, pad_token_id=None, seed=2)
    d = save(hf, tmp_path_factory.mktemp("pipe") / "ckpt", max_shard_size="8MB")
    shutil.copy(tok_path, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False, "chat_template": SOLAR_CHAT_TEMPLATE,
    }))
    return d


@pytest.fixture(scope="module")
def pipes(ckpt):
    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    except Exception as e:  # conversion of tokenizer.model needs sentencepiece + protobuf
        pytest.skip(f"transformers cannot build a tokenizer from tokenizer.model here: {e}")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    theirs = transformers.pipeline("text-generation", model=hf, tokenizer=hf_tok, device="cpu")
    ours = fastsolar.pipeline("text-generation", str(ckpt), device="cpu", dtype="float32")
    return ours, theirs


@pytest.mark.parametrize("inputs", [
    "Depth Up-Scaling is",
    ["Depth Up-Scaling is", "The cat sat on"],
    CHAT,
    [CHAT, [{"role": "user", "content": "Hello?"}]],
], ids=["string", "strings", "conversation", "conversations"])
@pytest.mark.parametrize("full", [True, False])
def test_generated_text_matches_transformers(pipes, inputs, full: bool) -> None:
    ours, theirs = pipes
    want = theirs(inputs, return_full_text=full, **GREEDY)
    got = ours(inputs, return_full_text=full, **GREEDY)
    assert got == want
    if not full:  # the completions alone have text (else any two empty outputs would agree)
        records = [r for group in got for r in (group if isinstance(group, list) else [group])]
        assert len(records) == (1 if isinstance(inputs, str) or isinstance(inputs[0], dict) else len(inputs))
        assert all(isinstance(r["generated_text"], str) and r["generated_text"].strip() for r in records)


def test_options_from_init_and_call(pipes, ckpt) -> None:
    """Options given to pipeline() apply to every call, the call's win; a loaded Solar with its tokenizer works."""
    ours, theirs = pipes
    pipe = fastsolar.pipeline("text-generation", model=ours.model, tokenizer=Tokenizer.from_pretrained(ckpt),
                              do_sample=False, max_new_tokens=14, repetition_penalty=1.5)
    long = theirs("The cat sat on", do_sample=False, max_new_tokens=14, repetition_penalty=1.5)
    short = theirs("The cat sat on", do_sample=False, max_new_tokens=4, repetition_penalty=1.5)
    assert pipe("The cat sat on") == long
    assert pipe("The cat sat on", max_new_tokens=4) == short != long


def test_sampled_calls_follow_the_seed(pipes) -> None:
    """The pipeline's default samples (transformers 5: do_sample with temperature 0.7); seed= reproduces it."""
    ours, _ = pipes
    a = ours("The cat sat on", max_new_tokens=12, seed=1)
    assert a == ours("The cat sat on", max_new_tokens=12, seed=1)
    assert a != ours("The cat sat on", max_new_tokens=12, seed=2)
    assert a != ours("The cat sat on", max_new_tokens=12, do_sample=False)


def test_bad_arguments_are_refused(pipes, ckpt) -> None:
    ours, _ = pipes
    with pytest.raises(ValueError, match="task 'summarization' is not supported"):
        fastsolar.pipeline("summarization", str(ckpt))
    with pytest.raises(ValueError, match="needs tokenizer="):
        fastsolar.pipeline("text-generation", ours.model)
    with pytest.raises(ValueError, match="device apply to a model loaded from its directory"):
        fastsolar.pipeline("text-generation", ours.model, tokenizer=ours.tokenizer, device="cpu")
    with pytest.raises(TypeError, match="'stop_sequence' is not supported"):
        ours("Hi", stop_sequence="\n")
    with pytest.raises(TypeError, match="text_inputs must be a string, a conversation"):
        ours(42)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        ours("Hi", max_new_tokens=2, do_sample=False, not_an_option=1)
    assert isinstance(ours.model, Solar)
