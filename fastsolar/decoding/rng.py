"""Counter-based random numbers per request row: the noise of token j at a row's step t is a pure function of
(the row's seed, t, j), so a seeded request draws the same randomness whatever else shares its batch.

A shared torch.Generator cannot do that: its stream is consumed by every row of the batch in turn, so what a
request draws depends on which other requests run beside it and in which batch row. Here each row carries its
own 64-bit key (from the request's seed) and step counter as device tensors, and

    u[j] = hash(key, t, j) in (0, 1)          (24 random bits, never 0 or 1)
    E[j] = -log(u[j]) ~ Exp(1)

feeds the exponential race `argmax(p / E)` of fastsolar.decoding.sampling.Sampler, which draws token j with
probability p[j].

The hash is murmur3's 32-bit finaliser (`fmix32`, a bijection with full avalanche) keyed twice:

    r1 = fmix32(k_lo ^ fmix32(k_hi ^ fmix32(t ^ SALT)))        per row
    r2 = fmix32(r1 ^ SALT2)                                      per row
    h  = fmix32(fmix32(j * GOLDEN ^ r1) ^ r2)                    per row and token

All arithmetic is on int64 tensors holding values below 2**32; `_mul32` multiplies modulo 2**32 in 16-bit
halves so no product exceeds 2**48 (int64 overflow never happens), and shifts act on non-negative values,
so the bits are the same on every device (CPU, CUDA) and `hash_ref` below reproduces them in plain Python.
Everything is elementwise on device tensors of fixed shape: no host sync, safe inside a captured CUDA graph.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1  # 2**32 / golden ratio: spreads consecutive token indices over the 32-bit range
SALT = 0x243F6A88  # pi's first fraction digits: nothing-up-my-sleeve constants
SALT2 = 0x85A308D3
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3 fmix32 multipliers
_INV_2_24 = 1.0 / (1 << 24)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow: x = hi * 2**16 + lo."""
    lo = x & 0xFFFF
    hi = x >> 16
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & M32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 13)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def row_keys(key: torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row round keys from `key` [b, 2] (low, high 32-bit words of the seed) and `counter` [b]."""
    r1 = fmix32(key[:, 0] ^ fmix32(key[:, 1] ^ fmix32((counter & M32) ^ SALT)))
    return r1, fmix32(r1 ^ SALT2)


def uniform(key: torch.Tensor, counter: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """u [b, V] float32 in (0, 1): row i's draw for token indices `index` [V] (int64 0..V-1) at step counter[i]."""
    r1, r2 = row_keys(key, counter)
    h = fmix32(fmix32(_mul32(index[None, :], GOLDEN) ^ r1[:, None]) ^ r2[:, None])
    return ((h >> 8).to(torch.float32) + 0.5) * _INV_2_24


def exponential(key: torch.Tensor, counter: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """E [b, V] ~ Exp(1), strictly positive (u < 1), for the exponential race."""
    return -torch.log(uniform(key, counter, index))


def seed_words(seed: int) -> tuple[int, int]:
    """A request's seed (any Python int) as the (low, high) 32-bit words of its two's-complement 64 bits."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    return s & M32, s >> 32


def hash_ref(seed: int, counter: int, j: int) -> int:
    """The 32-bit hash of `uniform` in plain Python integers (the reference the tests compare with)."""

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * _C1) & M32
        x ^= x >> 13
        x = (x * _C2) & M32
        return x ^ (x >> 16)

    lo, hi = seed_words(seed)
    r1 = mix(lo ^ mix(hi ^ mix((counter & M32) ^ SALT)))
    r2 = mix(r1 ^ SALT2)
    return mix(mix(((j * GOLDEN) & M32) ^ r1) ^ r2)
