"""The seed policy: every seed the package derives from a user's seed, in one place.

A run takes one user seed; every random stream it draws is seeded by a fixed function of that
seed and of what the stream is for, so results depend on (seed, purpose) only — never on the
order streams are made in, the batch or chunk a sample falls in, or the process that draws it:

- `derive_seed(*parts)`: a 63-bit seed from any tuple of ints / strings (blake2b of its repr).
  Training: derive_seed(seed, "data", rank, step) for the data order, (seed, "noise", step) for
  the bridge noise, (seed, "eval") for evaluation samples. Sharded sampling (psb_fast.sharded):
  (seed, "prior", i) for sample i's prior draw, (seed, "noise", k) for chunk k's SDE noise.
- `step_seed(seed, i)`: a 31-bit seed per (sampling seed, noise draw i) for the SDE solvers' and
  the guide's per-step noise in `PhaseSampler.sample` (crc32; draw -1 is the guide's generator).
- `row_seed(seed, row_offset)`: a 64-bit generator seed per (seed, first row) for
  `bridge_sample`, so rows drawn in pieces get the noise of one call (row_offset 0 keeps seed).
- `check_seed(seed, limit)`: a user's seed checked (an int in [0, limit)), or one drawn from torch's
  default generator for None (`resolve_seed`: the sampler's, below 2**31 - 1).

The values are part of the outputs' reproducibility (recorded samples, golden tests): changing a
formula here changes every seeded result.
"""

from __future__ import annotations

import hashlib
import zlib

import torch

#: Odd 64-bit constant (2**64 / golden ratio) that mixes row_offset into bridge-noise seeds.
GOLDEN_64 = 0x9E3779B97F4A7C15


def derive_seed(*parts: object) -> int:
    """A seed in [0, 2**63) from any tuple of ints / strings (stable across runs and machines)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def step_seed(seed: int, i: int) -> int:
    """A distinct 31-bit seed per (sampling seed, noise draw index)."""
    return zlib.crc32(f"{seed}:{i}".encode()) & 0x7FFFFFFF


def row_seed(seed: int, row_offset: int) -> int:
    """A 64-bit generator seed from (seed, row_offset); row_offset 0 leaves seed unchanged."""
    return (seed ^ (row_offset * GOLDEN_64)) % 2**64


#: Seeds the ops accept: [0, 2**63).
SEED_LIMIT = 1 << 63


def check_seed(seed: object, limit: int = SEED_LIMIT, draw_below: int | None = None) -> int:
    """seed as an int in [0, limit); None draws one in [0, draw_below or limit) from torch's
    default generator. TypeError for a non-int (bools included), ValueError out of range."""
    if seed is None:
        return int(torch.randint(0, draw_below or limit, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < limit:
        bound = f"2**{limit.bit_length() - 1}" if limit & (limit - 1) == 0 else str(limit)
        raise ValueError(f"seed must be in [0, {bound}), got {seed}")
    return seed


def resolve_seed(seed: int | None) -> int:
    """PhaseSampler.sample's seed: a non-negative int (ValueError otherwise), or None for one drawn
    in [0, 2**31 - 1)."""
    if seed is None:
        return check_seed(None, draw_below=2**31 - 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    return seed
