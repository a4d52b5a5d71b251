"""Drop-in acceleration for a transformers Llama/Mistral model: `patch_hf(model)`.

`patch_hf(model)` makes a loaded `LlamaForCausalLM` or `MistralForCausalLM` (SOLAR loads as Llama) run
fastsolar's kernels, in place, and returns it. Everything else (weights, cache, `generate`, sampling,
output capture) stays transformers'. Supported transformers versions: `SUPPORTED_TRANSFORMERS`
(fastsolar/versions.py, where every version gate lives): 5.17 through 5.25, whose decoder/attention code the
patched forwards mirror and which CI checks with tests/hf/test_hf_patch.py at both ends. Another version is
refused rather than patched on trust: widen the range after running that test file against it. Within the
range the attention forward's cache argument was renamed (`past_key_values` before 5.24, `cache` since,
when it also started handing its kwargs to `cache.update`); the patched forward accepts either name and
calls transformers' own forward and `cache.update` the way the installed version does.

The hooks, per decoder layer (instance attributes only: other models of the same class are untouched):
- RMSNorm modules (`input_layernorm`, the final `model.norm`): `forward` -> `rms_norm`.
- Decoder layer: `forward` replaced by the same pre-norm block, except that the attention residual add
  and `post_attention_layernorm` become one `add_rms_norm` pass. This is exact: transformers computes
  `residual + attn_out` in the input dtype and then the norm, which is what the fused kernel does.
  The MLP residual add is not fused into the *next* layer's input norm (as fastsolar's own model does):
  that would change what a decoder layer returns, which transformers' output capture and the final
  norm rely on.
- MLP: `forward` -> `down_proj(swiglu(gate_proj(x), up_proj(x)))`.
- Attention module: `forward` replaced by the same projection / cache / attention-interface sequence,
  but rotary is applied by `apply_rotary` on the projections' natural `[b, s, h, d]` layout with the
  layer's `position_ids` and `rope_theta`, before the transpose to transformers' `[b, h, s, d]`. This
  replaces transformers' `apply_rotary_pos_emb` (about ten element-wise kernels for q and k: mul,
  rotate_half's neg + cat, mul, add, with the precomputed cos/sin) by one launch for both, with no
  extra copy; the kernel computes the same cos/sin from the same fp32 angles (theta and positions,
  which is why the hook is the attention forward: `apply_rotary_pos_emb` only sees cos/sin, and
  feeding the kernel from there would need transposed copies of q and k). The model's own cos/sin
  (computed once per forward, not per layer) are still computed and used by the fallback paths.
- Attention: registered in transformers' own registry as "fastsolar" (`AttentionInterface`, plus the
  same mask function as "sdpa" in `AttentionMaskInterface`, so that transformers still builds padding
  and sliding-window masks) and selected with `model.set_attn_implementation("fastsolar")`. The
  registered function runs fastsolar's `attention` (transposed views, last dim contiguous) only when
  transformers passes no mask, which with the sdpa mask function means plain causal attention:
  prefill with q_len == kv_len, or a one-token decode step seeing every cached key (bottom-right
  causal). Everything else (a padding or sliding-window mask, a custom 4-D mask, a static-cache
  prefill with q_len < kv_len, dropout in training, softcap, ...) goes to transformers'
  `sdpa_attention_forward` unchanged: correctness first.

Which implementation runs follows fastsolar's seam (`fastsolar.ops.use_kernels`): the Triton kernels
for CUDA tensors (or for CPU tensors under the Triton interpreter when forced with
`fastsolar.ops.force_kernels(True)` / `FASTSOLAR_KERNELS=1`), their torch references otherwise. The
kernels have no backward: whenever autograd would record (grad mode on and a tensor that requires
grad), the patched modules run transformers' original code instead, so fine-tuning stays correct; the
kernel path is for `torch.no_grad()` / `torch.inference_mode()` (as `generate` uses) or a model with
`requires_grad_(False)`.

Refused, with nothing changed (TypeError for the wrong kind of model, ValueError for an unsupported
configuration or transformers version): other architectures, rope scaling (any rope_type but
"default"), attention/MLP biases, activations other than silu, head_dim outside the kernels' range,
modules whose `forward` is already overridden (e.g. accelerate offload hooks). A model is marked with
`model._fastsolar_patched = True`; calling `patch_hf` again on it is a no-op that returns it.
`unpatch_hf(model)` restores transformers' forwards and the previous attention implementation.
"""
from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn

from fastsolar import ops, versions
from fastsolar.versions import SUPPORTED_TRANSFORMERS

#: The name under which the attention function (and its mask function) is registered in transformers.
ATTN_IMPLEMENTATION = "fastsolar"
#: Attribute set on a patched model.
PATCHED_ATTR = "_fastsolar_patched"

_KERNEL_NAMES = ("rms_norm", "add_rms_norm", "apply_rotary", "swiglu", "attention")
_HEAD_DIM_RANGE = (16, 256)  # what fastsolar's attention and rotary kernels take (even head_dim)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------
# What the patched forwards need from transformers, looked up once (not at `import fastsolar`)
# --------------------------------------------------------------------------------------------------

@functools.cache
def _transformers_api() -> types.SimpleNamespace:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return types.SimpleNamespace(attention_functions=ALL_ATTENTION_FUNCTIONS, sdpa=sdpa_attention_forward,
                                 cache=versions.transformers_cache_api())


def _autograd(*tensors: torch.Tensor) -> bool:
    """Whether autograd would record an op on these tensors (the kernels have no backward)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------------------
# Patched forwards (bound to instances with types.MethodType)
# --------------------------------------------------------------------------------------------------

def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if w.dtype != hidden_states.dtype or _autograd(hidden_states, w):
        # transformers promotes to the weight's dtype when they differ; the kernel rounds to x's.
        return type(self).forward(self, hidden_states)
    return ops.rms_norm(hidden_states, w, self.variance_epsilon)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if _autograd(x, self.gate_proj.weight):
        return type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(ops.swiglu(gate, up))


def _decoder_layer_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    post = self.post_attention_layernorm
    if args or post.weight.dtype != hidden_states.dtype or _autograd(hidden_states, post.weight):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    for name in ("attention_mask", "position_ids", "position_embeddings"):
        kwargs.setdefault(name, None)
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    # transformers: h = residual + attn_out; y = post_attention_layernorm(h) -- one fused pass here.
    y, hidden_states = ops.add_rms_norm(hidden_states, residual, post.weight, post.variance_epsilon)
    return hidden_states + self.mlp(y)


def _attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # The decoder layer passes the KV cache as `cache` (transformers >= 5.24) or `past_key_values` (before).
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    api = _transformers_api()
    position_ids = kwargs.get("position_ids")
    b, s = hidden_states.shape[:2]
    if (
        position_ids is None
        or position_ids.dim() != 2
        or position_ids.shape[-1] != s
        or position_ids.shape[0] not in (1, b)
        or _autograd(hidden_states, self.q_proj.weight)
    ):
        return type(self).forward(
            self, hidden_states, position_embeddings, attention_mask, **{api.cache.name: cache}, **kwargs
        )

    d = self.head_dim
    q = self.q_proj(hidden_states).view(b, s, -1, d)
    k = self.k_proj(hidden_states).view(b, s, -1, d)
    v = self.v_proj(hidden_states).view(b, s, -1, d)
    q, k = ops.apply_rotary(q, k, position_ids.expand(b, s), self._fastsolar_rope_theta)
    query_states, key_states, value_states = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    if cache is not None:
        extra = {"kwargs": kwargs} if api.cache.update_kwargs else {}
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, **extra)

    attention_interface = api.attention_functions.get_interface(
        self.config._attn_implementation, self._fastsolar_eager_attention
    )
    extra = {"sliding_window": getattr(self.config, "sliding_window", None)} if self._fastsolar_mistral else {}
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **extra,
        **kwargs,
    )
    attn_output = attn_output.reshape(b, s, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def fastsolar_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: query `[b, h, sq, d]`, key/value `[b, kvh, sk, d]`;
    returns `(attn_output [b, sq, h, d], None)`.

    fastsolar's causal `attention` when the call is plain causal attention (no mask from transformers,
    sq == sk or a single query over the whole cache); transformers' sdpa function otherwise.
    """
    sq, sk = query.shape[2], key.shape[2]
    plain = (
        attention_mask is None
        and (sq == sk or sq == 1)
        and not (dropout and module.training)
        and kwargs.get("is_causal") is not False
        and getattr(module, "is_causal", True)
        and getattr(getattr(module, "config", None), "is_causal", True)
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and not kwargs.get("output_attentions")
        and query.dtype in _FLOAT
        and key.dtype == query.dtype
        and value.dtype == query.dtype
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and query.shape[1] % key.shape[1] == 0
        and not _autograd(query, key, value)
    )
    if not plain:
        return _transformers_api().sdpa(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [b, s, heads, d] views
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    return ops.attention(q, k, v, causal=True, scale=scaling), None


# --------------------------------------------------------------------------------------------------
# Checks and the patch itself
# --------------------------------------------------------------------------------------------------

def _check_transformers() -> None:
    import transformers

    versions.check_transformers()
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401
    except ImportError as e:
        raise ValueError(f"this transformers ({transformers.__version__}) lacks the attention registry: {e}") from None


def _model_classes() -> dict[type, dict[str, type]]:
    from transformers.models.llama import modeling_llama as L
    from transformers.models.mistral import modeling_mistral as M

    return {
        L.LlamaForCausalLM: dict(layer=L.LlamaDecoderLayer, attn=L.LlamaAttention, mlp=L.LlamaMLP,
                                 norm=L.LlamaRMSNorm, eager=L.eager_attention_forward),
        M.MistralForCausalLM: dict(layer=M.MistralDecoderLayer, attn=M.MistralAttention, mlp=M.MistralMLP,
                                   norm=M.MistralRMSNorm, eager=M.eager_attention_forward),
    }


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the config states no rope_theta")
    return float(theta)


def _check_model(model: Any) -> dict[str, type]:
    classes = _model_classes()
    kind = next((c for c in classes if type(model) is c), None)
    if kind is None:
        names = ", ".join(c.__name__ for c in classes)
        raise TypeError(f"patch_hf supports {names} (SOLAR loads as LlamaForCausalLM); got {type(model).__name__}")
    parts = classes[kind]
    config = model.config
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    rope_scaling = getattr(config, "rope_scaling", None)
    if isinstance(rope_scaling, dict) and rope_type == "default":
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"rope scaling ({rope_type!r}) is not supported by fastsolar's rotary kernel; only default RoPE"
        )
    rotary = model.model.rotary_emb
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise ValueError(f"rotary attention_scaling {rotary.attention_scaling} is not supported; only default RoPE")
    _rope_theta(config)
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"{flag}=True is not supported: fastsolar's kernels assume bias-free projections")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; swiglu needs 'silu'")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    lo, hi = _HEAD_DIM_RANGE
    if head_dim % 2 or not lo <= head_dim <= hi:
        raise ValueError(
            f"head_dim {head_dim} is not supported; fastsolar's kernels take an even head_dim in [{lo}, {hi}]"
        )
    if not getattr(config, "is_causal", True):
        raise ValueError("config.is_causal=False (bidirectional attention) is not supported")

    def own(module: nn.Module, cls: type, what: str) -> None:
        if type(module) is not cls:
            raise TypeError(f"{what} is {type(module).__name__}, expected {cls.__name__}: not a stock model")
        if "forward" in vars(module) or hasattr(module, "_hf_hook"):
            raise ValueError(
                f"{what} already has its forward overridden (accelerate offload hooks or another patch); "
                "patch_hf only patches stock transformers modules"
            )

    own(model.model.norm, parts["norm"], "model.norm")
    for i, layer in enumerate(model.model.layers):
        own(layer, parts["layer"], f"layer {i}")
        own(layer.self_attn, parts["attn"], f"layer {i} self_attn")
        own(layer.mlp, parts["mlp"], f"layer {i} mlp")
        own(layer.input_layernorm, parts["norm"], f"layer {i} input_layernorm")
        own(layer.post_attention_layernorm, parts["norm"], f"layer {i} post_attention_layernorm")
        if layer.self_attn.head_dim != head_dim:
            raise ValueError(f"layer {i} head_dim {layer.self_attn.head_dim} != config head_dim {head_dim}")
    return parts


def _check_kernels() -> None:
    missing = [n for n in _KERNEL_NAMES if not hasattr(ops.K, n) or not hasattr(ops.K, n + "_ref")]
    if missing:
        raise ImportError(f"fastsolar.kernels does not export {', '.join(missing)} (and their *_ref)")


def register_attention() -> None:
    """Register "fastsolar" in transformers' attention and attention-mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, fastsolar_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def patch_hf(model: Any) -> Any:
    """Make a transformers LlamaForCausalLM / MistralForCausalLM use fastsolar's kernels, in place.

    Returns the same model. Refuses (TypeError / ValueError, model untouched) anything it does not
    support; a second call on a patched model is a no-op. See the module docstring for the hooks.
    """
    if getattr(model, PATCHED_ATTR, False):
        return model
    _check_transformers()
    parts = _check_model(model)
    _check_kernels()

    register_attention()
    _transformers_api()  # resolve what the patched forwards use now, not on their first call
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        got = model.config._attn_implementation
        model.set_attn_implementation(previous)
        raise ValueError(f"transformers did not accept attn_implementation={ATTN_IMPLEMENTATION!r} (got {got!r})")

    theta = _rope_theta(model.config)
    mistral = parts["layer"].__name__.startswith("Mistral")
    bind = types.MethodType
    model.model.norm.forward = bind(_rms_norm_forward, model.model.norm)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn._fastsolar_rope_theta = theta
        attn._fastsolar_mistral = mistral
        attn._fastsolar_eager_attention = parts["eager"]
        attn.forward = bind(_attention_forward, attn)
        layer.mlp.forward = bind(_mlp_forward, layer.mlp)
        layer.input_layernorm.forward = bind(_rms_norm_forward, layer.input_layernorm)
        layer.post_attention_layernorm.forward = bind(_rms_norm_forward, layer.post_attention_layernorm)
        layer.forward = bind(_decoder_layer_forward, layer)
    model._fastsolar_previous_attn = previous
    setattr(model, PATCHED_ATTR, True)
    return model


def unpatch_hf(model: Any) -> Any:
    """Undo `patch_hf`: transformers' own forwards and the previous attention implementation again."""
    if not getattr(model, PATCHED_ATTR, False):
        return model
    modules = [model.model.norm]
    for layer in model.model.layers:
        modules += [layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm]
    for m in modules:
        vars(m).pop("forward", None)
    for layer in model.model.layers:
        for name in ("_fastsolar_rope_theta", "_fastsolar_mistral", "_fastsolar_eager_attention"):
            vars(layer.self_attn).pop(name, None)
    model.set_attn_implementation(model._fastsolar_previous_attn)
    del model._fastsolar_previous_attn
    delattr(model, PATCHED_ATTR)
    return model


__all__ = ["patch_hf", "unpatch_hf", "fastsolar_attention", "register_attention", "SUPPORTED_TRANSFORMERS",
           "ATTN_IMPLEMENTATION", "PATCHED_ATTR"]
