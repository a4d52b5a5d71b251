"""The SOLAR / Llama-2 decoder in plain torch.

Pre-norm transformer: per layer h += attn(rms_norm(h)); h += mlp(rms_norm(h)), then a final norm and
the lm_head. Each norm is fused into the matrix product after it and each residual add into the product
before it (`ops.norm_linear`, `ops.linear(..., residual=)`, `ops.swiglu_linear(..., residual=)`), so a
decode step of one layer is six launches on the kernel path: qkv, rotary + cache write, attention, o,
gate_up, down. Attention is grouped-query with rotary positions in the Hugging Face half-rotation layout;
the MLP is SwiGLU. q/k/v live in one fused weight and gate/up in another (fused at load time, so each
token reads one matrix instead of three). All math goes through `fastsolar.ops`, the seam that picks the
Triton kernels on CUDA and their torch references elsewhere; this file imports no triton.

Three entry points share one layer stack:
- `model(input_ids)`: full logits `[batch, seq, vocab]`, no cache (what tests compare with transformers).
- `prefill(input_ids, seqlens, rows=None)`: right-padded prompts written into the static KV cache from
  position 0; returns the logits of each row's last real token.
- `decode(tokens, positions, rows=None)`: one token per row at per-row device positions; graph-safe (no
  host sync, no value-dependent shapes), so it can be captured in a CUDA graph.
Both use cache rows 0..b-1 by default; `rows` maps batch row i onto cache row rows[i] instead, so a
serving engine can keep each request in its own row of one static cache while requests come and go.

A linear layer may be quantised (fastsolar.model.quant.QuantLinear: int8 / FP8 `weight` plus an fp32
`weight_scale` per output row, or packed int4 with group scales and zeros, swapped in by the loader or
`quant.quantize`); every product passes the layer's quantisation arguments (`_quant`: none for a plain
nn.Linear) with its weight, and the ops handle each kind.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastsolar import memory, ops
from fastsolar.config import SolarConfig


def _quant(layer: nn.Module) -> dict:
    """A quantised linear layer's kernel arguments beside its weight (scale=, zeros=, group_size=); {} for an
    unquantised one."""
    args = getattr(layer, "kernel_args", None)
    return args() if args is not None else {}


@dataclass
class KVCache:
    """Static key/value cache for all layers: `[layers, max_batch, max_seq, n_kv_heads, head_dim]`."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def max_batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq(self) -> int:
        return self.k.shape[2]


@dataclass
class DecodeSlots:
    """Where a decode step writes and reads the cache: computed once per step, shared by every layer."""

    rows: torch.Tensor | None  # [b] cache row of each batch row (a caller's map); None: rows 0..b-1
    seqlens: torch.Tensor  # [b] int32 valid cache positions after the write (pos + 1)


class Attention(nn.Module):
    def __init__(self, config: SolarConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        qkv_rows = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, qkv_rows, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        h: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        positions: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        slots: DecodeSlots | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h + attention(rms_norm(h)) for the residual stream h `[b, s, hidden]`; positions `[b, s]`. With
        `cache` (this layer's `[max_batch, max_seq, kv, d]` views): a decode step when `slots` is given,
        else a prefill from position 0 into cache rows `rows` (default 0..b-1)."""
        b, s, _ = h.shape
        qkv = ops.norm_linear(h, norm_weight, eps, self.wqkv.weight, **_quant(self.wqkv))
        q, k, v = qkv.view(b, s, self.n_heads + 2 * self.n_kv_heads, self.head_dim).split(
            [self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        if cache is None:
            q, k = ops.apply_rotary(q, k, positions, self.theta)
            o = ops.attention(q, k, v, causal=True)
        else:
            # One launch rotates q and k and writes k, v into their cache slots; attention then reads the
            # keys from the cache (a decode step its whole history, a prefill just its own prompt).
            k_cache, v_cache = cache
            rows = slots.rows if slots is not None else rows
            q = ops.rotary_cache_write(q, k, v, positions, self.theta, k_cache, v_cache, rows=rows)
            if slots is not None:
                if rows is None:
                    k_cache, v_cache = k_cache[:b], v_cache[:b]
                o = ops.decode_attention(q[:, 0], k_cache, v_cache, slots.seqlens, rows=rows).unsqueeze(1)
            elif rows is None:
                o = ops.attention(q, k_cache[:b, :s], v_cache[:b, :s], causal=True)
            else:
                o = ops.attention(q, k_cache[:, :s], v_cache[:, :s], causal=True, rows=rows)
        return ops.linear(o.reshape(b, s, self.n_heads * self.head_dim), self.wo.weight, residual=h,
                          **_quant(self.wo))


class FeedForward(nn.Module):
    def __init__(self, config: SolarConfig) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.w_down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
        """h + mlp(rms_norm(h)) for the residual stream h."""
        gate_up = ops.norm_linear(h, norm_weight, eps, self.w_gate_up.weight, **_quant(self.w_gate_up))
        return ops.swiglu_linear(gate_up, self.w_down.weight, residual=h, **_quant(self.w_down))


class Block(nn.Module):
    def __init__(self, config: SolarConfig) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.attention_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.attention = Attention(config)
        self.ffn_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.feed_forward = FeedForward(config)

    def forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        slots: DecodeSlots | None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The residual stream after this layer."""
        h = self.attention(h, self.attention_norm, self.eps, positions, cache, slots, rows)
        return self.feed_forward(h, self.ffn_norm, self.eps)


class Transformer(nn.Module):
    """SOLAR-10.7B and its Llama-2 / Mistral relatives, for inference: weights and config, and the three
    forward passes (module docstring). Loading and generation live above it (`fastsolar.Solar`)."""

    def __init__(self, config: SolarConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.cache: KVCache | None = None

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def _layers(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        use_cache: bool,
        slots: DecodeSlots | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the layer stack; returns the residual stream `[b, s, hidden]` (before the final norm)."""
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            cache = (self.cache.k[i], self.cache.v[i]) if use_cache else None
            h = layer(h, positions, cache, slots, rows)
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm fused with the lm_head."""
        return ops.norm_linear(h, self.norm, self.config.rms_norm_eps, self.lm_head.weight, **_quant(self.lm_head))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward without a cache: logits `[batch, seq, vocab]` in the model's dtype."""
        self._check_ids(input_ids)
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device).expand(b, s)
        return self._logits(self._layers(input_ids, positions, use_cache=False))

    def setup_cache(self, max_batch: int, max_seq: int) -> KVCache:
        """Allocate (or keep, if large enough) the static KV cache, after checking that it fits."""
        if max_seq > self.config.max_position_embeddings:
            raise ValueError(
                f"max_seq {max_seq} exceeds the model's context of {self.config.max_position_embeddings} tokens"
            )
        old = self.cache
        if (old is not None and old.max_batch >= max_batch and old.max_seq >= max_seq
                and old.k.dtype == self.dtype and old.k.device == self.device):
            return old
        c = self.config
        shape = (c.num_hidden_layers, max_batch, max_seq, c.num_key_value_heads, c.head_dim)
        self.cache = old = None  # release the old cache before measuring free memory
        memory.check_fits(f"the KV cache {shape}", self.device, self.dtype, 2 * torch.Size(shape).numel() * self.dtype.itemsize,
                          advice="Lower the batch size or the maximum sequence length.")
        # A normal tensor even when called under inference_mode (as generate does), so that prefill and
        # decode can also be used under plain no_grad afterwards.
        with torch.inference_mode(False):
            self.cache = KVCache(
                k=torch.empty(shape, device=self.device, dtype=self.dtype),
                v=torch.empty(shape, device=self.device, dtype=self.dtype),
            )
        return self.cache

    def prefill(
        self, input_ids: torch.Tensor, seqlens: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Write right-padded prompts `[b, s]` (row i real for its first seqlens[i] tokens) into the cache
        from position 0, into cache rows `rows` [b] (distinct; default 0..b-1); returns the logits
        `[b, vocab]` of each row's last real token. Other cache rows are left as they are."""
        b, s = input_ids.shape
        if self.cache is None or self.cache.max_seq < s or (rows is None and self.cache.max_batch < b):
            raise RuntimeError(f"prefill of batch {b} x {s} tokens needs setup_cache(max_batch>={b}, max_seq>={s})")
        if rows is not None:
            rows = self._check_rows(rows, b)
        positions = torch.arange(s, device=input_ids.device).expand(b, s)
        # Right padding plus causal masking leaves every real token's attention exact; padded slots
        # land in the cache beyond seqlens, where decode never reads and later steps overwrite.
        h = self._layers(input_ids, positions, use_cache=True, rows=rows)
        last = h[torch.arange(b, device=h.device), seqlens.to(h.device).long() - 1]
        return self._logits(last)

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One step: tokens `[b]` at cache positions `[b]` (device tensors) in cache rows `rows` [b] (a device
        tensor of distinct rows, default 0..b-1; not checked, that would sync); returns logits `[b, vocab]`."""
        b = tokens.shape[0]
        if rows is not None and tuple(rows.shape) != (b,):
            raise ValueError(f"rows must have shape [{b}] (one cache row per token), got {tuple(rows.shape)}")
        slots = DecodeSlots(rows=rows, seqlens=(positions + 1).to(torch.int32))
        h = self._layers(tokens[:, None], positions[:, None], use_cache=True, slots=slots)
        return self._logits(h[:, 0])

    def _check_rows(self, rows: torch.Tensor, b: int) -> torch.Tensor:
        """`rows` as int64 on the model's device after checking it names b distinct cache rows (a host
        sync: prefill is not captured in a graph)."""
        if not isinstance(rows, torch.Tensor) or rows.dtype not in (torch.int32, torch.int64):
            raise TypeError("rows must be an int64 (or int32) tensor of cache row indices")
        if tuple(rows.shape) != (b,):
            raise ValueError(f"rows must have shape [{b}] (one cache row per prompt), got {tuple(rows.shape)}")
        values = rows.tolist()
        bad = [r for r in values if not 0 <= r < self.cache.max_batch]
        if bad or len(set(values)) != b:
            raise ValueError(f"rows {values} must be distinct cache rows in [0, {self.cache.max_batch})")
        return rows.to(self.device, torch.int64)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse what would otherwise fail deep inside torch (or as a device-side assert on CUDA)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("input_ids must be an int64 (or int32) tensor of token ids")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): at least one token is needed")
        limit = self.config.max_position_embeddings
        if input_ids.shape[1] > limit:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds the context of {limit} tokens")
        lo, hi = (int(v) for v in torch.aminmax(input_ids))  # a host sync; forward is not the decode hot path
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
