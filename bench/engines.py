"""The engines bench/run.py measures, and the models they run: fastsolar's `Solar` and transformers'
`LlamaForCausalLM`, on random weights or loaded from a checkpoint.

An engine is one way of generating behind one call, `gen(ids [b, s], n) -> new tokens [b, n]`: greedy, EOS
ignored (always exactly n tokens), through the library's public generate(). FastsolarEngine runs
fastsolar.decoding.generate (with or without CUDA graphs, on the Triton kernels or on the torch reference ops);
HFEngine runs transformers' generate() (sdpa with a dynamic cache, or a static cache that generate compiles
itself). Engines build no model: they ask a `Models` (run.py's Bench) for one, which builds each model once
and hands the same object to every engine.

Random weights are initialised like transformers' (normal std 0.02, norms 1), in place on the device
(random_solar). hf_sharing_weights builds transformers' model on the meta device and points every parameter
at fastsolar's tensors: q/k/v and gate/up are row slices (views) of fastsolar's fused wqkv and w_gate_up
matrices, the others are the very same tensors, so one copy of the weights serves both libraries and every
engine. A real checkpoint (--model) is loaded by each library itself (hf_from_pretrained): two copies.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel

    from fastsolar.config import SolarConfig
    from fastsolar import Solar

log = logging.getLogger("bench")


# ------------------------------------------------------------------------------------ models and weights


def random_solar(config: SolarConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Solar:
    """fastsolar's model with transformers-style random weights (normal std 0.02, norms 1), built in place
    on the device (no host copy of the weights)."""
    from fastsolar import Solar

    with torch.device("meta"):
        model = Solar(config).to(dtype)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def fit_layers(
    config: SolarConfig, device: torch.device, dtype: torch.dtype, extra_bytes: int
) -> tuple[SolarConfig, str | None]:
    """On CUDA, fewer layers when the full model plus `extra_bytes` of working memory does not fit."""
    if device.type != "cuda":
        return config, None
    free, _ = torch.cuda.mem_get_info(device)
    size = dtype.itemsize
    embed = config.vocab_size * config.hidden_size * size * (1 if config.tie_word_embeddings else 2)
    per_layer = (config.num_parameters() - embed // size) // config.num_hidden_layers * size
    need = embed + per_layer * config.num_hidden_layers + extra_bytes
    if need <= free:
        return config, None
    layers = max(1, int((free - extra_bytes - embed) // per_layer))
    note = (f"only {free / 2**30:.1f} GiB free: {config.num_hidden_layers} layers need {need / 2**30:.1f} GiB, "
            f"so the model was cut to {layers} layers")
    log.warning(note)
    return config.replace(num_hidden_layers=layers), note


def hf_config_from(config: SolarConfig, dtype: torch.dtype) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=None, pad_token_id=0,
        attn_implementation="sdpa", dtype=str(dtype).replace("torch.", ""),
    )


def hf_sharing_weights(model: Solar, dtype: torch.dtype) -> PreTrainedModel:
    """A transformers LlamaForCausalLM whose parameters are views of fastsolar's (no second copy)."""
    from torch import nn
    from transformers import LlamaForCausalLM

    c = model.config
    cfg = hf_config_from(c, dtype)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg).to(dtype)

    def put(module: nn.Module, tensor: torch.Tensor) -> None:
        module.weight = nn.Parameter(tensor, requires_grad=False)

    hf.model.embed_tokens.weight = nn.Parameter(model.embed_tokens.weight, requires_grad=False)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    for ours, theirs in zip(model.layers, hf.model.layers):
        wqkv = ours.attention.wqkv.weight
        put(theirs.self_attn.q_proj, wqkv[:q])
        put(theirs.self_attn.k_proj, wqkv[q:q + kv])
        put(theirs.self_attn.v_proj, wqkv[q + kv:])
        put(theirs.self_attn.o_proj, ours.attention.wo.weight)
        gu = ours.feed_forward.w_gate_up.weight
        put(theirs.mlp.gate_proj, gu[: c.intermediate_size])
        put(theirs.mlp.up_proj, gu[c.intermediate_size:])
        put(theirs.mlp.down_proj, ours.feed_forward.w_down.weight)
        put(theirs.input_layernorm, ours.attention_norm)
        put(theirs.post_attention_layernorm, ours.ffn_norm)
    put(hf.model.norm, model.norm)
    put(hf.lm_head, model.lm_head.weight)
    with torch.device(model.device):  # inv_freq was computed on meta; recompute it on the device
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    meta = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"transformers model still has meta tensors: {meta[:5]}")
    return _hf_ready(hf)


def hf_from_pretrained(model_dir: Path, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    # use_kernels=False: transformers >= 5.25 would otherwise swap in Hub kernels (a download, and not the baseline).
    kw = dict(dtype=dtype, attn_implementation="sdpa", use_kernels=False)
    try:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, device_map=str(device), **kw)
    except (ImportError, ValueError) as e:  # no accelerate for device_map: load, then move
        log.info("device_map unavailable (%s); loading then moving", e)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, **kw).to(device)
    return _hf_ready(hf)


def _hf_ready(hf):
    gc_ = hf.generation_config
    gc_.eos_token_id = None  # ignore EOS: every engine generates exactly N tokens
    gc_.pad_token_id = 0
    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if hasattr(gc_, name):
            setattr(gc_, name, None)
    gc_.do_sample = False
    return hf.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- engines


def decode_weight_bytes(model: Solar) -> int:
    """Bytes of weights one decode step reads: every parameter in its storage dtype (one byte per int8/fp8
    weight plus the fp32 scales) except the embedding table, of which a step gathers only its tokens' rows;
    a table tied to the lm_head is read whole."""
    embed = model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embed)


class Models(Protocol):
    """Where engines get their models (run.py's Bench): the bf16 ones are built on first use, then shared;
    a quantised one is built for its engine."""

    def fastsolar_model(self): ...

    def quantized_model(self, mode: str): ...

    def hf_model(self): ...


class Engine:
    """An engine: `gen(ids [b, s], n) -> new tokens [b, n]`, greedy, EOS ignored."""

    name = ""
    notes: list[str]
    weight_bytes: int | None = None  # weights a decode step reads; None: the unquantised model's

    def __init__(self) -> None:
        self.notes = []

    def gen(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FastsolarEngine(Engine):
    def __init__(
        self, bench: Models, name: str, graphs: bool, kernels: bool | None, quantize: str | None = None
    ) -> None:
        super().__init__()
        self.name, self.graphs, self.kernels = name, graphs, kernels
        self.session = None
        self.model = bench.fastsolar_model() if quantize is None else bench.quantized_model(quantize)
        self.weight_bytes = decode_weight_bytes(self.model)
        if quantize is not None:
            where = "" if self.model.device.type == "cuda" else ", on the torch reference ops (dequantise, then matmul)"
            self.notes.append(f"{quantize} weights, {self.weight_bytes / 1e9:.3g} GB read per step{where}")

    def gen(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        from fastsolar import ops
        from fastsolar.decoding.generate import generate
        from fastsolar.decoding.session import DecodeSession

        # One decode session (cache and graphs) reused across calls, as a serving loop would hold it.
        b, need = ids.shape[0], ids.shape[1] + n
        if self.session is None or not self.session.fits(b, need):
            self.session = None  # the old cache freed before the new one is checked against free memory
            self.session = DecodeSession(self.model, b, need)
        with ops.force_kernels(self.kernels):
            out = generate(self.model, ids, n, temperature=0.0, eos_token_id=[], cuda_graphs=self.graphs,
                           session=self.session)
        # n > 1: at least one decode step ran, so a graph must have been captured
        if self.graphs and n > 1 and self.session.graphs.captures == 0:
            raise RuntimeError("cuda_graphs=True but no CUDA graph was captured")
        return out[:, ids.shape[1]:]

    def close(self) -> None:
        if self.graphs and self.session is not None and self.session.graphs.captures:
            self.notes.append(f"{self.session.graphs.captures} graph captures")
        self.session = None
        self.model = None


class HFEngine(Engine):
    def __init__(self, bench: Models, name: str, compiled: bool) -> None:
        super().__init__()
        self.name, self.compiled = name, compiled
        self.hf = bench.hf_model()
        self.kwargs: dict[str, Any] = {}
        if compiled:
            from transformers import CompileConfig

            # transformers' own auto-compile of the decode step (generate compiles the forward when the cache
            # is static); fullgraph left at transformers' default (False) so a graph break degrades instead of
            # failing; dynamic=False: one static compile per batch size, no symbolic-shape recompiles.
            config = CompileConfig(dynamic=False, mode="reduce-overhead")
            self.kwargs = dict(cache_implementation="static", compile_config=config)
            self.notes.append(f"static cache, {config}")

    def gen(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **self.kwargs)
        new = out[:, ids.shape[1]:]
        if new.shape[1] != n:
            raise RuntimeError(f"transformers generated {new.shape[1]} tokens instead of {n}")
        return new

    def close(self) -> None:
        self.hf = None
        if self.compiled:
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
