"""Small random transformers models saved as Hugging Face checkpoints, for parity and loader tests.

Every builder is deterministic (seeded) and returns `(hf_model, model_dir)`. The shapes are tiny but
awkward: GQA 2:1, an odd vocabulary, norms that are not all ones, several safetensors shards.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 997
MAX_POS = 256
PAD_ID = 0
EOS_ID = 2


def small_config_kwargs(**overrides) -> dict:
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POS, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        attention_bias=False, mlp_bias=False,
    )
    kw.update(overrides)
    return kw


def build_hf_model(kind: str = "llama", *, seed: int = 0, lm_head_scale: float = 8.0, **overrides):
    """A random float32 LlamaForCausalLM (or MistralForCausalLM) with randomised norms and a scaled-up
    lm_head so that greedy tokens are well separated (ties cannot flip a token)."""
    import transformers

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**small_config_kwargs(**overrides))
        cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        kw = small_config_kwargs(**overrides)
        kw.pop("attention_bias"), kw.pop("mlp_bias")
        cfg = transformers.MistralConfig(sliding_window=None, **kw)
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    model = cls(cfg).to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.mul_(lm_head_scale)
    return model


def save(model, model_dir: Path, *, max_shard_size: str | int = "60KB") -> Path:
    model_dir = Path(model_dir)
    model.save_pretrained(model_dir, max_shard_size=max_shard_size)
    return model_dir


def rewrite_config_legacy(model_dir: Path) -> dict:
    """Rewrite config.json in the form SOLAR's own checkpoint uses (transformers 4.x): top-level
    rope_theta and torch_dtype, no head_dim, no rope_parameters, no dtype."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    dtype = cfg.pop("dtype", None) or cfg.get("torch_dtype") or "float32"
    for k in ("head_dim", "rope_scaling", "rope_theta", "torch_dtype"):
        cfg.pop(k, None)
    cfg.update(rope_theta=theta, rope_scaling=None, torch_dtype=dtype, transformers_version="4.35.2",
               architectures=["LlamaForCausalLM"])
    path.write_text(json.dumps(cfg, indent=2))
    return cfg


def shard_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def make_tokenizer_module():
    """tests/data/make_tokenizer.py (the tiny sentencepiece and tokenizer.json trainers), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tokenizer", Path(__file__).parent / "data" / "make_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_json_checkpoint(model_dir: Path, *, seed: int = 1) -> Path:
    """A tiny random Llama (float32) whose only tokenizer is the Llama-3-style byte-level BPE tokenizer.json of
    tests/data/make_tokenizer.py (403 tokens: bos 0, eos <|eot_id|> 4), saved as transformers saves it."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=403, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(model_dir)
    make_tokenizer_module().train_tokenizer_json(model_dir)
    return Path(model_dir)


# -- the real SOLAR / Mistral tokenizer ----------------------------------------------------------------

REAL_TOKENIZER_SHA256_PREFIX = "dadfd56d"


def real_tokenizer_path() -> Path:
    """Mistral-7B's real `tokenizer.model` (the one SOLAR inherits: 32000 pieces), as the mistral-common wheel
    ships it (`mistral_common/data/tokenizer.model.v1`). Skips the calling test when mistral-common is not
    installed; raises when the file is not the expected one (sha256 prefix)."""
    import hashlib
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("mistral_common")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mistral-common is not installed (pip install -e '.[test]'): it ships the real tokenizer.model")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common has no {path}; the tests expect tokenizer.model.v1 there")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(REAL_TOKENIZER_SHA256_PREFIX):
        raise RuntimeError(f"{path} has sha256 {digest}, not the Mistral/SOLAR tokenizer ({REAL_TOKENIZER_SHA256_PREFIX}...)")
    return path


def greedy_ids(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """transformers greedy continuation of `ids` without any EOS stop (full forward each step; tiny models
    only), with the winning logit of each step."""
    seq, top = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            seq.append(int(logits.argmax()))
            top.append(float(logits.max()))
    return seq[len(ids):], top


def plant_eos(model, prompt_ids: list[int], *, eos_id: int = EOS_ID, after: int = 8, within: int = 24) -> int:
    """Make the greedy continuation of `prompt_ids` end with `eos_id` between `after` and `within` new tokens.

    The lm_head row of `eos_id` becomes 1.25x the row of the token greedy decoding picks at the first step
    >= `after` where that token is new to the continuation (and its logit positive), so eos takes its place
    there, or a little earlier where that token was a close second. Returns the number of new tokens up to
    and including the eos. Raises if no such step exists (pick another seed or prompt)."""
    new, top = greedy_ids(model, prompt_ids, within)
    for k in range(after, within):
        if new[k] not in new[:k] and new[k] != eos_id and top[k] > 1.0:
            with torch.no_grad():
                model.lm_head.weight[eos_id] = 1.25 * model.lm_head.weight[new[k]]
            planted, _ = greedy_ids(model, prompt_ids, k + 1)
            if eos_id in planted:
                return planted.index(eos_id) + 1
            raise RuntimeError(f"planted eos did not appear within {k + 1} tokens")
    raise RuntimeError(f"no step in [{after}, {within}) to plant eos at")
