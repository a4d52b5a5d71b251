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
- `model(input_ids, attention_mask=None, labels=None)`: transformers' output (`.logits` `[batch, seq, vocab]`,
  `.loss` given labels; fastsolar.model.outputs), no cache (what tests compare with transformers).
- `prefill(input_ids, seqlens, cache, rows=None)`: right-padded prompts written into a static `KVCache` from
  position 0; returns the logits of each row's last real token.
- `decode(tokens, positions, cache, rows=None)`: one token per row at per-row device positions; graph-safe (no
  host sync, no value-dependent shapes), so it can be captured in a CUDA graph.
Both use cache rows 0..b-1 by default; `rows` maps batch row i onto cache row rows[i] instead, so a
serving engine can keep each request in its own row of one static cache while requests come and go.
The cache is an argument: the model holds weights and config only, and whoever decodes owns its cache
(fastsolar.decoding.session.DecodeSession), handed to every layer as a `CacheView`.

A linear layer may be quantised (fastsolar.model.quant.QuantLinear: int8 / FP8 `weight` plus an fp32
`weight_scale` per output row, or packed int4 with group scales and zeros, swapped in by the loader or
`quant.quantize`); every product passes the layer's quantisation arguments (`_quant`: none for a plain
nn.Linear) with its weight, and the ops handle each kind.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastsolar import memory, ops
from fastsolar.config import SolarConfig
from fastsolar.model.outputs import IGNORE_INDEX, CausalLMOutput, causal_lm_loss
from fastsolar.model.sharding import Shard, ShardSizes


def check_token_ids(ids: torch.Tensor | Sequence[int], vocab_size: int) -> None:
    """ValueError naming the first token id outside the vocabulary [0, vocab_size) (for a tensor: its lowest or
    highest, one host sync): the one check of token ids, for forward, generate and the server."""
    if isinstance(ids, torch.Tensor):
        if ids.numel() == 0:
            return
        lo, hi = (int(v) for v in torch.aminmax(ids))
        bad = lo if lo < 0 else (hi if hi >= vocab_size else None)
    else:
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {vocab_size})")


def _quant(layer: nn.Module) -> dict:
    """A quantised linear layer's kernel arguments beside its weight (scale=, zeros=, group_size=); {} for an
    unquantised one."""
    args = getattr(layer, "kernel_args", None)
    return args() if args is not None else {}


@dataclass
class KVCache:
    """Static key/value cache for all layers: `[layers, max_batch, max_seq, n_kv_heads, head_dim]`. Owned by
    whoever decodes (fastsolar.decoding.session.DecodeSession), never by the model."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(
        cls, config: SolarConfig, max_batch: int, max_seq: int, device: torch.device, dtype: torch.dtype,
        kv_heads: int | None = None,
    ) -> "KVCache":
        """An uninitialised cache of `max_batch` rows x `max_seq` positions, after checking that it fits the
        model's context and the memory free on `device` (memory.InsufficientMemoryError). `kv_heads`: the KV
        heads one tensor-parallel rank holds (`model.kv_heads`; default all of them)."""
        for name, value in (("max_batch", max_batch), ("max_seq", max_seq)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_seq > config.max_position_embeddings:
            raise ValueError(f"max_seq {max_seq} exceeds the model's context of {config.max_position_embeddings} tokens")
        shape = (config.num_hidden_layers, max_batch, max_seq, kv_heads or config.num_key_value_heads, config.head_dim)
        memory.check_fits(f"the KV cache {shape}", device, dtype, 2 * torch.Size(shape).numel() * dtype.itemsize,
                          advice="Lower the batch size or the maximum sequence length.")
        # Normal tensors even when made under inference_mode (as generate does), so that prefill and decode can
        # also run under plain no_grad afterwards.
        with torch.inference_mode(False):
            return cls(k=torch.empty(shape, device=device, dtype=dtype), v=torch.empty(shape, device=device, dtype=dtype))

    @property
    def max_batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq(self) -> int:
        return self.k.shape[2]


@dataclass
class CacheView:
    """What one pass does with the cache, computed once and handed to every layer: write each token's key and
    value at (rows[i], positions[i, t]), then attend over the cache, as a prefill from position 0 (`seqlens`
    None) or as a decode step whose rows hold `seqlens` valid positions after the write."""

    cache: KVCache
    rows: torch.Tensor | None  # [b] cache row of each batch row; None: rows 0..b-1
    seqlens: torch.Tensor | None  # decode: [b] int32 valid positions after the write (pos + 1); prefill: None

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.k[i], self.cache.v[i]


class Attention(nn.Module):
    def __init__(self, config: SolarConfig, shard: Shard) -> None:
        super().__init__()
        sizes = ShardSizes.of(config, shard.world_size)
        self.shard = shard
        self.n_heads = sizes.n_heads
        self.n_kv_heads = sizes.n_kv_heads
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
        view: CacheView | None,
        layer: int,
    ) -> torch.Tensor:
        """h + attention(rms_norm(h)) for the residual stream h `[b, s, hidden]`; positions `[b, s]`. Without a
        cache view: causal attention over h alone; with one: a prefill or a decode step through layer `layer`
        of the cache (CacheView)."""
        b, s, _ = h.shape
        qkv = ops.norm_linear(h, norm_weight, eps, self.wqkv.weight, **_quant(self.wqkv))
        q, k, v = qkv.view(b, s, self.n_heads + 2 * self.n_kv_heads, self.head_dim).split(
            [self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        if view is None:
            q, k = ops.apply_rotary(q, k, positions, self.theta)
            o = ops.attention(q, k, v, causal=True)
        else:
            # One launch rotates q and k and writes k, v into their cache slots; attention then reads the
            # keys from the cache (a decode step its whole history, a prefill just its own prompt).
            k_cache, v_cache = view.layer(layer)
            rows = view.rows
            q = ops.rotary_cache_write(q, k, v, positions, self.theta, k_cache, v_cache, rows=rows)
            if rows is None:  # batch row i is cache row i
                k_cache, v_cache = k_cache[:b], v_cache[:b]
            if view.seqlens is not None:
                o = ops.decode_attention(q[:, 0], k_cache, v_cache, view.seqlens, rows=rows).unsqueeze(1)
            else:
                o = ops.attention(q, k_cache[:, :s], v_cache[:, :s], causal=True, rows=rows)
        # Split by input columns, each rank's product is a partial sum: the residual is added once (rank 0),
        # inside the fused epilogue, and the all-reduce joins the partial sums.
        y = ops.linear(o.reshape(b, s, self.n_heads * self.head_dim), self.wo.weight,
                       residual=h if self.shard.rank == 0 else None, **_quant(self.wo))
        return self.shard.all_reduce(y)


class FeedForward(nn.Module):
    def __init__(self, config: SolarConfig, shard: Shard) -> None:
        super().__init__()
        intermediate = ShardSizes.of(config, shard.world_size).intermediate
        self.shard = shard
        self.w_gate_up = nn.Linear(config.hidden_size, 2 * intermediate, bias=False)
        self.w_down = nn.Linear(intermediate, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
        """h + mlp(rms_norm(h)) for the residual stream h."""
        gate_up = ops.norm_linear(h, norm_weight, eps, self.w_gate_up.weight, **_quant(self.w_gate_up))
        y = ops.swiglu_linear(gate_up, self.w_down.weight, residual=h if self.shard.rank == 0 else None,
                              **_quant(self.w_down))
        return self.shard.all_reduce(y)


class Block(nn.Module):
    def __init__(self, config: SolarConfig, shard: Shard) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.attention_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.attention = Attention(config, shard)
        self.ffn_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.feed_forward = FeedForward(config, shard)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, view: CacheView | None, layer: int) -> torch.Tensor:
        """The residual stream after this layer (layer `layer` of the cache view, if any)."""
        h = self.attention(h, self.attention_norm, self.eps, positions, view, layer)
        return self.feed_forward(h, self.ffn_norm, self.eps)


class Transformer(nn.Module):
    """SOLAR-10.7B and its Llama-2 / Mistral relatives, for inference: weights and config, and the three
    forward passes (module docstring). Loading and generation live above it (`fastsolar.Solar`).

    `shard` (default: the whole model) makes this one rank's slice of a tensor-parallel model
    (fastsolar.model.sharding; built and loaded by fastsolar.parallel): the config stays the whole model's,
    the layers hold this rank's heads, MLP columns and vocabulary rows, and every pass returns the full logits."""

    def __init__(self, config: SolarConfig, shard: Shard | None = None) -> None:
        super().__init__()
        self.config = config
        self.shard = shard = shard or Shard()
        sizes = ShardSizes.of(config, shard.world_size)
        self.kv_heads = sizes.n_kv_heads  # the KV heads this rank's cache holds
        self.embed_tokens = nn.Embedding(sizes.vocab, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, shard) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = nn.Linear(config.hidden_size, sizes.vocab, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, view: CacheView | None) -> torch.Tensor:
        """Run the layer stack; returns the residual stream `[b, s, hidden]` (before the final norm)."""
        h = self.shard.embed(self.embed_tokens.weight, input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, view, i)
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm fused with the lm_head."""
        local = ops.norm_linear(h, self.norm, self.config.rms_norm_eps, self.lm_head.weight, **_quant(self.lm_head))
        return self.shard.logits(local, self.config.vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Full causal forward without a cache, as transformers' `LlamaForCausalLM(input_ids, attention_mask,
        labels)`: `.logits` `[batch, seq, vocab]` in the model's dtype and, given labels, `.loss` (transformers'
        shift-by-one cross entropy, -100 ignored; fastsolar.model.outputs).

        `attention_mask` (1 = token, 0 = padding; the ones of a row contiguous: left or right padding) makes
        each row's real tokens count their positions from the row's first one and never see its pads, so their
        logits are what the row gets alone; the logits at pad positions are finite but meaningless."""
        self._check_ids(input_ids)
        logits = self._masked_logits(input_ids, attention_mask)
        if labels is None:
            return CausalLMOutput(logits)
        self._check_labels(labels, input_ids.shape)
        return CausalLMOutput(logits, causal_lm_loss(logits, labels))

    def _masked_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, s = input_ids.shape
        lead = self._leading_pads(attention_mask, (b, s), input_ids.device)
        cols = torch.arange(s, device=input_ids.device)
        ids = input_ids
        if lead is not None:
            # Roll each row left by its leading pads: the real tokens then sit at positions 0..n-1 followed by the
            # pads, where causal attention keeps the pads out of every real token's view (the cacheless causal
            # kernel needs no key mask); the logits are rolled back into place.
            ids = input_ids.gather(1, (cols[None, :] + lead[:, None]) % s)
        # The followers of a driven tensor-parallel group run the same layer passes on these ids.
        self.shard.starting("forward", None, input_ids=ids)
        logits = self._logits(self._layers(ids, cols.expand(b, s), None))
        if lead is None:
            return logits
        back = (cols[None, :] - lead[:, None]) % s
        return logits.gather(1, back[:, :, None].expand(b, s, logits.shape[-1]))

    @staticmethod
    def _leading_pads(mask: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """Each row's count of pads before its first token ([b] int64 on `device`), or None when no row has
        any; refuses a mask that is not a [b, s] tensor of 0/1 whose ones are contiguous and non-empty."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
            found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask must have the shape of input_ids {shape}, got {found}")
        mask = mask.to(device)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
        ones = mask.to(torch.int64)
        count = ones.sum(dim=1)
        if bool((count == 0).any()):
            raise ValueError(f"attention_mask rows {(count == 0).nonzero().flatten().tolist()} have no tokens")
        lead = ones.argmax(dim=1)  # index of the first 1
        # Contiguous ones: every 1 lies in [lead, lead + count).
        cols = torch.arange(shape[1], device=device)
        inside = (cols[None, :] >= lead[:, None]) & (cols[None, :] < (lead + count)[:, None])
        if not bool((inside == ones.bool()).all()):
            raise ValueError("attention_mask has a 0 between two 1s in a row; only left or right padding is "
                             "supported (each row's tokens contiguous)")
        return lead if bool(lead.any()) else None

    def _check_labels(self, labels: torch.Tensor, shape: torch.Size) -> None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
            raise TypeError("labels must be an int64 (or int32) tensor of token ids (-100: no loss)")
        if labels.shape != shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(shape)}, got {tuple(labels.shape)}")
        check_token_ids(labels[labels != IGNORE_INDEX], self.config.vocab_size)

    def prefill(
        self, input_ids: torch.Tensor, seqlens: torch.Tensor, cache: KVCache, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Write right-padded prompts `[b, s]` (row i real for its first seqlens[i] tokens) into `cache` from
        position 0, into cache rows `rows` [b] (distinct; default 0..b-1); returns the logits `[b, vocab]` of
        each row's last real token. Other cache rows are left as they are."""
        b, s = input_ids.shape
        if cache.max_seq < s or (rows is None and cache.max_batch < b):
            raise ValueError(f"a prefill of batch {b} x {s} tokens needs a cache of at least {b} rows x {s} "
                             f"positions; this one has {cache.max_batch} x {cache.max_seq}")
        if rows is not None:
            rows = self._check_rows(rows, b, cache.max_batch)
        self.shard.starting("prefill", cache, input_ids=input_ids, seqlens=seqlens, rows=rows)
        positions = torch.arange(s, device=input_ids.device).expand(b, s)
        # Right padding plus causal masking leaves every real token's attention exact; padded slots
        # land in the cache beyond seqlens, where decode never reads and later steps overwrite.
        h = self._layers(input_ids, positions, CacheView(cache, rows, None))
        last = h[torch.arange(b, device=h.device), seqlens.to(h.device).long() - 1]
        return self._logits(last)

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One step: tokens `[b]` at cache positions `[b]` (device tensors) in cache rows `rows` [b] (a device
        tensor of distinct rows, default 0..b-1; not checked, that would sync); returns logits `[b, vocab]`."""
        b = tokens.shape[0]
        if rows is not None and tuple(rows.shape) != (b,):
            raise ValueError(f"rows must have shape [{b}] (one cache row per token), got {tuple(rows.shape)}")
        self.shard.starting("decode", cache, tokens=tokens, positions=positions, rows=rows)
        view = CacheView(cache, rows, (positions + 1).to(torch.int32))
        h = self._layers(tokens[:, None], positions[:, None], view)
        return self._logits(h[:, 0])

    def copy_cache_rows(self, cache: KVCache, src: torch.Tensor, dst: torch.Tensor, length: torch.Tensor) -> None:
        """Copy the keys and values of cache row `src` (a 0-d tensor) at its first `length` (0-d) positions,
        every layer, into rows `dst` ([n] int64 on the model's device; checked by the caller,
        fastsolar.decoding.DecodeSession.copy_rows). A pass of its own so that the followers of a driven
        tensor-parallel group copy their KV heads too."""
        self.shard.starting("copy_cache_rows", cache, src=src, dst=dst, length=length)
        s, n = int(src), int(length)
        for t in (cache.k, cache.v):  # [layers, rows, positions, heads, head_dim]
            t[:, :, :n].index_copy_(1, dst, t[:, s:s + 1, :n].expand(-1, dst.numel(), -1, -1, -1))

    def _check_rows(self, rows: torch.Tensor, b: int, max_batch: int) -> torch.Tensor:
        """`rows` as int64 on the model's device after checking it names b distinct cache rows (a host
        sync: prefill is not captured in a graph)."""
        if not isinstance(rows, torch.Tensor) or rows.dtype not in (torch.int32, torch.int64):
            raise TypeError("rows must be an int64 (or int32) tensor of cache row indices")
        if tuple(rows.shape) != (b,):
            raise ValueError(f"rows must have shape [{b}] (one cache row per prompt), got {tuple(rows.shape)}")
        values = rows.tolist()
        bad = [r for r in values if not 0 <= r < max_batch]
        if bad or len(set(values)) != b:
            raise ValueError(f"rows {values} must be distinct cache rows in [0, {max_batch})")
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
        check_token_ids(input_ids, self.config.vocab_size)  # a host sync; forward is not the decode hot path
