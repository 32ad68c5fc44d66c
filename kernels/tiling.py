"""Row x column tiling shared by the kernels, and the per-element normal pair (Philox, Box-Muller).

Every kernel works on rows: a tensor viewed as [B, n] with unit column stride and any row stride
(x, F, the label, noise; m = [x | v] is [B, 2n], v at column offset n). A program covers a tile
of BLOCK_R rows x BLOCK_C columns (`TILES`); the 1-D grid runs over row blocks x column blocks,
column blocks fastest (program p: row block p // col_blocks, column block p % col_blocks), so no
element index is ever divided. Program-level offsets (first row and column, times strides) are
int64 scalars; within a tile the row part is an int64 vector over BLOCK_R rows and the column
part the int32 range 0..BLOCK_C-1, so no 32-bit product of two sizes exists anywhere (checked on
the TTIR by compile_check.int32_overflows). Rows have fewer than 2**31 elements (MAX_ROW); B,
row strides, offsets and seeds may be larger. With n and the row strides divisible by 16 (Triton
specializes on that) each row segment of a tile is 16-byte aligned and contiguous: 16-byte loads
and stores whatever n is.

The tile shape follows the row length (`tile_shape`). Rows of a multiple of 16 elements get one
row x 1024 columns when that uses at least 7/8 of the lanes, else 64 rows x 16 columns (all
lanes used). Other rows have no 16-byte accesses anyway; they get one row x 1024 columns when
that uses at least half the lanes (every row of 512 elements or more: whole rows stay
coalesced), else 64 x 2 (one element per thread, rows at least 15/16 used unless shorter than
16). 1024-element tiles hold 8 elements per thread: 16-byte accesses in every storage dtype. In
all three a thread's elements lie in at most two rows (the bridge's per-row coefficients cost at
most 16 registers per thread), and the per-row vectors of a 64-row tile stay below one element
per thread, so that Triton does not give their loads a layout of their own (and a shared-memory
conversion). Under the Triton interpreter the tiles are larger (INTERPRETER_TILE_ELEMENTS).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

TILES = ((1, 1024), (64, 16), (64, 2))  # (BLOCK_R, BLOCK_C)
MIN_COLUMN_USE = 7 / 8  # of the 1 x 1024 tile's lanes, rows of a multiple of 16 elements
MIN_COLUMN_USE_UNALIGNED = 1 / 2  # other rows
# Under the Triton interpreter (CPU tensors, TRITON_INTERPRET=1) every program costs Python-level
# work per operation, so one tile takes up to this many elements (a power of two): fewer, larger
# programs. The kernels are generic in the tile shape and their noise does not depend on it.
# None: the GPU tiles (tests/test_kernels_native.py runs them under the interpreter too).
INTERPRETER_TILE_ELEMENTS: int | None = 16384
NUM_WARPS = 4
MAX_PROGRAMS = 2**31 - 1  # CUDA's grid.x limit
# Rows have fewer elements than this: n stays a 32-bit kernel argument (B, strides, offsets and
# seeds may exceed 2**31), so the 64-bit launches that compile_check covers are all there are.
MAX_ROW = 2**31
# Launch options of every kernel: FMA contraction on (Triton 3.9 warns that the default turns off
# in 3.10; the float32 element math of the tests and of the GPU agree either way within tolerance).
LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=True)


def tile_shape(n: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for rows of n elements."""
    if INTERPRETER_TILE_ELEMENTS and os.environ.get("TRITON_INTERPRET") == "1":
        cols = min(triton.next_power_of_2(max(n, 1)), INTERPRETER_TILE_ELEMENTS)
        return INTERPRETER_TILE_ELEMENTS // cols, cols
    wide, aligned, narrow = TILES
    least = MIN_COLUMN_USE if n % 16 == 0 else MIN_COLUMN_USE_UNALIGNED
    if n == 0 or n / (triton.cdiv(n, wide[1]) * wide[1]) >= least:
        return wide
    return aligned if n % 16 == 0 else narrow


def tile_grid(B: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, col_blocks, programs) for [B, n] rows; raises ValueError for rows of
    MAX_ROW elements or more, or a grid of more than MAX_PROGRAMS programs."""
    if n >= MAX_ROW:
        raise ValueError(f"rows must have fewer than {MAX_ROW} elements (C * prod(rest)), got {n}")
    rows, cols = tile_shape(n)
    col_blocks = triton.cdiv(n, cols)
    programs = triton.cdiv(B, rows) * col_blocks
    if programs > MAX_PROGRAMS:
        raise ValueError(
            f"[{B}, {n}] rows need {programs} programs of {rows}x{cols} elements, more than {MAX_PROGRAMS}"
        )
    return rows, cols, col_blocks, programs


@triton.jit
def tile(B, n, col_blocks, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: (r0, c0) its first row and column (int64), i and j the in-tile row and
    column ranges (int32), mask [BLOCK_R, BLOCK_C] for rows < B and columns < n."""
    pid = tl.program_id(0)
    r0 = tl.cast(pid // col_blocks, tl.int64) * BLOCK_R
    c0 = tl.cast(pid % col_blocks, tl.int64) * BLOCK_C
    i = tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_C)
    row_mask = i < tl.minimum(B - r0, BLOCK_R).to(tl.int32)
    col_mask = j < tl.minimum(n - c0, BLOCK_C).to(tl.int32)
    return r0, c0, i, j, row_mask[:, None] & col_mask[None, :]


@triton.jit
def tile_ptrs(ptr, stride, r0, c0, i, j):
    """[BLOCK_R, BLOCK_C] pointers to rows r0 + i, columns c0 + j of a [*, stride]-strided tensor."""
    rows = ptr + (r0 * stride + c0) + tl.cast(i, tl.int64) * stride
    return rows[:, None] + j[None, :]


@triton.jit
def philox_block(seed, g):
    """The four 32-bit words of the Philox4x32-10 block of element index g (int64 tensor):
    counter (lo32(g), hi32(g), 0, 0) under the 64-bit key `seed`, as tl.philox."""
    lo = g.to(tl.uint32)
    hi = (g >> 32).to(tl.uint32)
    zero = lo * 0
    return tl.philox(seed, lo, hi, zero, zero, 10)


@triton.jit
def normal_pair(seed, g, like):
    """Two independent N(0, 1) per element index g (int64 tensor): (r cos t, r sin t).

    One Philox block per element (`philox_block`). Its first word w0 gives the radius
    r = sqrt(-2 log u), u = w0 as tl.uint_to_uniform_float (31 bits, in [0, 1)) floored at 1e-7,
    as tl.pair_uniform_to_normal. The second word gives the angle t = 2 pi v / 2**31, v = the
    same 31 bits of w1: v is split exactly into the nearest quarter turn k and a remainder angle
    |a| <= pi / 4, whose sine and cosine are Taylor polynomials (truncation < 2e-9, total error
    about 1 float32 ulp), then rotated by k quarter turns. Unlike tl.sin / tl.cos (libdevice)
    this has no large-argument branch (no stack frame, no table in global memory) and costs
    about 20 instructions for both.

    `like`: a float32 tensor of g's shape computed from a load (x1, x): its values do not matter,
    only its layout. umulhi(bits, 1) is 0 for every input; adding it to the counter ties the
    noise to the loaded data, so Triton's layout propagation computes the noise in the loaded
    data's vectorized layout instead of the default one-element-per-thread layout followed by
    a shared-memory conversion (its rematerialization cost model rejects moving a Philox chain).
    LLVM folds the product away; the compile check asserts no conversion and no barrier.
    """
    g = g + tl.umulhi(like.to(tl.uint32, bitcast=True), 1).to(tl.int64)
    w0, w1, _, _ = philox_block(seed, g)
    r = tl.sqrt(-2.0 * tl.log(tl.maximum(1.0e-7, tl.uint_to_uniform_float(w0))))
    s = w1.to(tl.int32, bitcast=True)
    v = tl.where(s < 0, ~s, s).to(tl.uint32, bitcast=True)  # 31 bits
    k = (v + (1 << 28)) >> 29  # nearest quarter turn, 0..4
    a = (v - (k << 29)).to(tl.int32, bitcast=True).to(tl.float32) * 2.9258361e-09  # 2 pi / 2**31
    a2 = a * a
    sin_a = a + a * a2 * (-1.6666667e-01 + a2 * (8.3333333e-03 + a2 * (-1.9841270e-04 + a2 * 2.7557319e-06)))
    cos_a = 1.0 + a2 * (-0.5 + a2 * (4.1666667e-02 + a2 * (-1.3888889e-03 + a2 * (
        2.4801587e-05 + a2 * -2.7557319e-07))))
    q = k & 3
    odd = (q & 1) != 0
    c = tl.where(odd, sin_a, cos_a)
    sn = tl.where(odd, cos_a, sin_a)
    c = tl.where((q == 1) | (q == 2), -c, c)
    sn = tl.where(q >= 2, -sn, sn)
    return r * c, r * sn
