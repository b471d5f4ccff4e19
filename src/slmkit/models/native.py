"""slmkit's native CPU kernels: built on first use with the system C compiler, loaded with ctypes, optional.

`native_kernels.c` (next to this file) holds the matrix products of CPU decoding (issue #24; docs/compression.md
"The native kernels", docs/inference.md sixth round):
- int8 and int4 weights in tiles of 4 rows x 32 columns read as one stream, activations quantized per row to int16,
  exact int32 dot products (AVX-512 VNNI, AVX-512 BW or AVX2; int4 on AVX-512 only). torch 2.13's
  `_weight_int8pack_mm` at one row ran at about a third of this machine's read bandwidth.
- fp32 weights in nn.Linear's own row-major layout, one row at a time (one sequential stream, faster than MKL's
  matrix-vector product over either layout); used through `slmkit.models.decode_layout`.
A portable C path compiles everywhere; it is correct but slow, so it is not used by default. `huge_empty` gives
the memory those weights are moved into (transparent huge pages, where the OS grants them).

The library is compiled once per source, compiler and CPU (`cc -O3 -march=native -shared -fPIC`) into
`$SLMKIT_KERNEL_CACHE` (default `~/.cache/slmkit/kernels`, or a temporary directory when that is not writable);
a compile takes well under a second. No compiler, a failed build or `SLMKIT_NATIVE_KERNELS=0` in the environment:
`library()` is None, the reason is logged once, and the layers keep torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_kernels.c")
CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11")
TILE_ROWS, TILE_COLS = 4, 32
# the SIMD level the library was built with: 3 AVX-512 VNNI, 2 AVX-512 BW, 1 AVX2, 0 portable C
MIN_LEVEL = 1
ENV_SWITCH = "SLMKIT_NATIVE_KERNELS"
ENV_CACHE = "SLMKIT_KERNEL_CACHE"


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags (so a shared home directory on several machines
    keeps one build per CPU)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n".join(keep)


def _cache_dirs() -> list[Path]:
    base = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "slmkit", "kernels")
    return [Path(base), Path(tempfile.gettempdir()) / f"slmkit-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"]


def _compile(source: Path, target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: another process loading the same path never sees a partial file
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *CFLAGS, "-o", partial, str(source), "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (reason logged) where it cannot be built or is switched off."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        log.info("native CPU kernels switched off (%s)", ENV_SWITCH)
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        log.info("native CPU kernels not built: no C compiler (cc/gcc/clang) on PATH; torch's kernels are used")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(CFLAGS).encode() + compiler.encode() + _cpu_key().encode()).hexdigest()
    name = f"slmkit_native_{key[:16]}.so"
    errors = []
    for directory in _cache_dirs():
        target = directory / name
        try:
            if not target.exists():
                _compile(SOURCE, target, compiler)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            errors.append(f"{directory}: {detail.strip().splitlines()[-1] if detail.strip() else exc}")
            continue
        return declare(lib)
    log.info("native CPU kernels not built (%s); torch's kernels are used", "; ".join(errors))
    return None


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set the argument and result types of the library's functions (a build of `SOURCE`)."""
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.slm_simd_level.restype = ctypes.c_int
    lib.slm_simd_level.argtypes = []
    lib.slm_q8_linear.restype = ctypes.c_int
    lib.slm_q8_linear.argtypes = [p] * 5 + [i64] * 3
    lib.slm_f32_linear.restype = None
    lib.slm_f32_linear.argtypes = [p] * 4 + [i64] * 3
    lib.slm_q4_linear.restype = ctypes.c_int
    lib.slm_q4_linear.argtypes = [p] * 4 + [i64] * 4
    lib.slm_decode_fields.restype = ctypes.c_int
    lib.slm_decode_fields.argtypes = []
    # x, layer fields, layers, dims, eps, cos table, sin table, positions, their stride, rows, cache row stride, upto,
    # final norm, out, scratch
    lib.slm_decode_layers.restype = ctypes.c_int
    lib.slm_decode_layers.argtypes = [p, p, i64, p, ctypes.c_float, p, p, p, i64, i64, i64, i64, p, p, p]
    return lib


def simd_level() -> int:
    """3 AVX-512 VNNI, 2 AVX-512 BW, 1 AVX2, 0 portable C; -1 where the library is not available."""
    lib = library()
    return -1 if lib is None else int(lib.slm_simd_level())


def int8_available() -> bool:
    """Whether Int8Linear should use the native int8 kernel on CPU (a vectorized build)."""
    return simd_level() >= MIN_LEVEL


def int4_available() -> bool:
    """Whether Int4Linear should use the native int4 kernel on CPU (AVX-512 builds; its AVX2 path is scalar)."""
    return simd_level() >= 2


def f32_available() -> bool:
    """Whether fp32 decode products should use the native fp32 kernel on CPU (a vectorized build)."""
    return simd_level() >= MIN_LEVEL


def f32_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(M, K) fp32 contiguous CPU input, (N, K) fp32 contiguous weight -> (M, N): F.linear(x2, weight, bias)."""
    lib = library()
    assert lib is not None
    m, k = x2.shape
    n = weight.shape[0]
    y = torch.empty(m, n)
    lib.slm_f32_linear(
        x2.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None, y.data_ptr(), m, n, k
    )
    return y


@torch.library.custom_op("slmkit::f32_linear", mutates_args=())
def f32_linear_op(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`f32_linear` as a torch op (no bias), so that a compiled decode step calls the kernel."""
    return f32_linear(x2, weight, None)


@f32_linear_op.register_fake
def _(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x2.new_empty(x2.shape[0], weight.shape[0])


# ---- memory in huge pages -----------------------------------------------------------------------
HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14  # Linux


@functools.lru_cache(maxsize=1)
def _madvise():  # type: ignore[no-untyped-def]
    if platform.system() != "Linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def huge_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A new 1-D CPU tensor whose memory the kernel is asked to back with transparent huge pages (Linux
    madvise(MADV_HUGEPAGE) before anything touches it; elsewhere, or where the kernel declines, plain pages).

    Weights read once per token stream faster from 2 MB pages: on the AMD EPYC this was measured on (THP in madvise
    mode, so nothing gets huge pages unasked), the native fp32 kernel over every 124m product read 27.8 GB/s from
    huge pages against 13.7-22.2 GB/s from the same weights in 4 kB pages, the 154 MB head 29.9 vs 15-22 GB/s."""
    t = torch.empty(numel, dtype=dtype)
    advise = _madvise()
    start = (t.data_ptr() + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = (t.data_ptr() + t.numel() * t.element_size()) & ~(HUGE_PAGE - 1)
    if advise is not None and end > start:
        advise(start, end - start, _MADV_HUGEPAGE)  # best effort: an error leaves plain pages
    return t


def huge_slots(likes: list[tuple[torch.Size, torch.dtype]], align: int = 64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Empty tensors of the given shapes and dtypes, back to back (each at a multiple of `align` bytes) in one
    `huge_empty` allocation: the allocation (uint8) and the tensors, views of it. Callers copy their weights in one
    at a time and re-point them, so each old tensor is freed as its copy is made."""
    nbytes = [math.prod(shape) * dtype.itemsize for shape, dtype in likes]
    arena = huge_empty(sum(-(-n // align) * align for n in nbytes), torch.uint8)
    slots, offset = [], 0
    for (shape, dtype), n in zip(likes, nbytes, strict=True):
        slots.append(arena[offset : offset + n].view(dtype).view(shape))
        offset += -(-n // align) * align
    return arena, slots


# ---- the tiled int8 layout -----------------------------------------------------------------------
def tile_int8(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 row-major codes -> the kernel's tiles, shape (ceil(N/4), K/32, 4, 32), padded with zero rows."""
    n, k = codes.shape
    if k % TILE_COLS:
        raise ValueError(f"tile_int8: K={k} is not a multiple of {TILE_COLS}")
    pad = (-n) % TILE_ROWS
    if pad:
        codes = torch.cat((codes, codes.new_zeros(pad, k)))
    blocks = codes.reshape(-1, TILE_ROWS, k // TILE_COLS, TILE_COLS)
    return blocks.transpose(1, 2).contiguous()


def untile_int8(tiles: torch.Tensor, n: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """The kernel's tiles -> the (N, K) row-major codes they hold, as `dtype` (a new tensor, one pass)."""
    blocks, chunks = tiles.shape[0], tiles.shape[1]
    out = torch.empty(blocks * TILE_ROWS, chunks * TILE_COLS, dtype=dtype, device=tiles.device)
    out.view(blocks, TILE_ROWS, chunks, TILE_COLS).copy_(tiles.transpose(1, 2))
    return out[:n]


def tiled_rows(tiles: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` (any shape of row numbers) of the tiled codes, shape (*idx.shape, K): an embedding lookup."""
    chunks = tiles.shape[1]
    flat = idx.reshape(-1)
    rows = tiles[flat // TILE_ROWS, :, flat % TILE_ROWS, :]  # (len, K/32, 32)
    return rows.reshape(*idx.shape, chunks * TILE_COLS)


def int8_linear(
    x2: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, n: int
) -> torch.Tensor:
    """(M, K) fp32 contiguous CPU input -> (M, N) fp32: x2 @ (codes * scales[:, None]).T (+ bias)."""
    lib = library()
    assert lib is not None
    m, k = x2.shape
    y = torch.empty(m, n, dtype=torch.float32)
    bias_ptr = 0 if bias is None else bias.data_ptr()
    status = lib.slm_q8_linear(x2.data_ptr(), tiles.data_ptr(), scales.data_ptr(), bias_ptr, y.data_ptr(), m, n, k)
    if status:
        raise MemoryError("slm_q8_linear: could not allocate its scratch buffer")
    return y


@torch.library.custom_op("slmkit::int8_linear", mutates_args=())
def int8_linear_op(x2: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    """`int8_linear` as a torch op (no bias), so that a compiled step calls the kernel instead of breaking."""
    return int8_linear(x2, tiles, scales, None, n)


@int8_linear_op.register_fake
def _(x2: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    return x2.new_empty(x2.shape[0], n)


# ---- the tiled int4 layout -----------------------------------------------------------------------
INT4_TILE_BYTES = TILE_COLS // 2


def tile_int4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) codes in [0, 15] and (N, K/g) fp32 scales and zeros (w = (q - 8) * scale + zero) -> the kernel's
    tiles (ceil(N/4), K/32, 4, 16) uint8 (byte j: column j low, column j + 16 high) and its (ceil(N/4), K/g, 2, 4)
    fp32 scales-then-zeros per block and group; padding rows are code 8 with scale and zero 0."""
    n, k = codes.shape
    if k % TILE_COLS or group_size % TILE_COLS or k % group_size:
        raise ValueError(f"tile_int4: K={k} and group size {group_size} must be multiples of {TILE_COLS}")
    pad = (-n) % TILE_ROWS
    codes = codes.to(torch.uint8)
    if pad:
        codes = torch.cat((codes, codes.new_full((pad, k), 8)))
        scales = torch.cat((scales, scales.new_zeros(pad, scales.shape[1])))
        zeros = torch.cat((zeros, zeros.new_zeros(pad, zeros.shape[1])))
    blocks = codes.reshape(-1, TILE_ROWS, k // TILE_COLS, TILE_COLS).transpose(1, 2)  # (B, C, 4, 32)
    tiles = (blocks[..., :INT4_TILE_BYTES] | (blocks[..., INT4_TILE_BYTES:] << 4)).contiguous()
    groups = k // group_size

    def per_block(t: torch.Tensor) -> torch.Tensor:
        return t.float().reshape(-1, TILE_ROWS, groups).transpose(1, 2)  # (B, G, 4)

    sz = torch.stack((per_block(scales), per_block(zeros)), dim=2).contiguous()  # (B, G, 2, 4)
    return tiles, sz


def untile_int4(tiles: torch.Tensor, n: int) -> torch.Tensor:
    """The kernel's int4 tiles -> the (N, K) uint8 codes they hold."""
    low, high = tiles & 0x0F, tiles >> 4
    blocks = torch.cat((low, high), dim=-1)  # (B, C, 4, 32)
    return blocks.transpose(1, 2).reshape(tiles.shape[0] * TILE_ROWS, -1)[:n].contiguous()


def int4_linear(x2: torch.Tensor, tiles: torch.Tensor, sz: torch.Tensor, n: int, group_size: int) -> torch.Tensor:
    """(M, K) fp32 contiguous CPU input -> (M, N) fp32: x2 @ W.T for the int4 tiles and scales of `tile_int4`."""
    lib = library()
    assert lib is not None
    m, k = x2.shape
    y = torch.empty(m, n, dtype=torch.float32)
    if lib.slm_q4_linear(x2.data_ptr(), tiles.data_ptr(), sz.data_ptr(), y.data_ptr(), m, n, k, group_size):
        raise MemoryError("slm_q4_linear: could not allocate its scratch buffer")
    return y


@torch.library.custom_op("slmkit::int4_linear", mutates_args=())
def int4_linear_op(x2: torch.Tensor, tiles: torch.Tensor, sz: torch.Tensor, n: int, group_size: int) -> torch.Tensor:
    """`int4_linear` as a torch op, for compiled steps."""
    return int4_linear(x2, tiles, sz, n, group_size)


@int4_linear_op.register_fake
def _(x2: torch.Tensor, tiles: torch.Tensor, sz: torch.Tensor, n: int, group_size: int) -> torch.Tensor:
    return x2.new_empty(x2.shape[0], n)
