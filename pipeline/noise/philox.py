"""Triton's Philox 4x32-10 streams, in torch: the reference definitions of ε (normal) and of the
embedding noise's uniforms.

`tl.randn(key, offset)` runs Philox on the counter (offset_lo, offset_hi, 0, 0) with the 64-bit key
split into (lo, hi), turns the first two words into uniforms and those into one Box-Muller normal.
This file copies `triton/language/random.py` step by step so that the integers and uniforms are
bit-identical to Triton's and the normals differ only by float32 log/cos rounding. `tl.rand(key,
offset)` is the first word's uniform alone, so `philox_uniform` is bit-identical to it.

Words are held in int64 lanes in [0, 2**32). Products of two words can reach 2**64, which would
overflow int64, so `_mul_hi_lo` splits one factor into 16-bit halves: every partial product stays
below 2**48 and the result is exact on any device.
"""

from __future__ import annotations

import torch

ROUNDS = 10
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
# Triton's uint -> [0, 1) scale for 32-bit words (largest value with MAX_INT * scale < 1 in float32).
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(constant: int, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of constant * word, for a 32-bit constant and int64 lanes < 2**32."""
    word_hi, word_lo = word >> 16, word & 0xFFFF
    upper = constant * word_hi  # < 2**48
    lower = constant * word_lo  # < 2**48
    high = (upper + (lower >> 16)) >> 16
    low = (((upper & 0xFFFF) << 16) + lower) & _MASK32
    return high, low


def philox_words(key: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two output words of Philox 4x32-10 for int64 `offsets` (what tl.randn consumes)."""
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for _ in range(ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1


def words_to_uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit words: reinterpret as int32, fold negatives, scale."""
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)  # ~x == -x - 1
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def uniforms_to_normal(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Triton's pair_uniform_to_normal, first output (Box-Muller cosine branch), in float32."""
    u1 = torch.clamp_min(u1, 1.0e-7)
    theta = u2 * torch.tensor(6.283185307179586, dtype=torch.float32)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta)


def philox_normal(key: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 standard normals equal to `tl.randn(key, offsets)` (to float32 log/cos rounding)."""
    w0, w1 = philox_words(key, offsets.to(torch.int64))
    return uniforms_to_normal(words_to_uniform(w0), words_to_uniform(w1))


def philox_uniform(key: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1) equal, bit for bit, to `tl.rand(key, offsets)`."""
    w0, _ = philox_words(key, offsets.to(torch.int64))
    return words_to_uniform(w0)


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def stream_key(seed: int, tick: int, layer: int) -> int:
    """The Philox key for one (seed, tick, layer): a well-mixed 64-bit value in [2**62, 2**63).

    The range is fixed on purpose: Triton types an integer argument by its value (i32 below 2**31,
    u64 from 2**63), so a key that could land in either would compile a second kernel on some tick.
    """
    for part in (seed, tick, layer):
        if part < 0:
            raise ValueError(f"noise seed, tick and layer must be >= 0, got {part}")
    mixed = _splitmix64(_splitmix64(_splitmix64(seed) ^ tick) ^ (layer + 0x632BE59BD9B4E019))
    return (mixed >> 2) | (1 << 62)
