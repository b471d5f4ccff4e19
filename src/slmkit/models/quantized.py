"""Compressed layers that stay compressed in memory, and the loader that swaps them into a model.

Phase 2 of the two-phase scheme (phase 1, in quantize.py / lowrank.py, turns a float state dict into
packed tensors): build the model on the meta device, swap each compressed `nn.Linear` / `nn.Embedding`
for the module below that matches the spec in `config.json`, then load the packed state dict into it.

- `Int8Linear`: int8 weights (N, K) + one fp32 scale per output row; on CPU, inputs of up to
  `INT8_KERNEL_MAX_ROWS` rows (decode) go through `torch.ops.aten._weight_int8pack_mm`, larger ones (prefill) widen
  one layer's weight at a time for F.linear, the faster of the two at each size (docs/compression.md).
- `Int4Linear`: two 4-bit codes per byte + an fp16 scale and zero per group of `group_size` inputs
  (w = (q - 8) * scale + zero); on CPU `_weight_int4pack_mm_for_cpu` runs on the packed weights; elsewhere
  (or for shapes that kernel refuses) the forward unpacks one layer at a time and calls F.linear.
  Optional outliers (SpQR-style) are a sparse fp16 correction added after the matmul.
- Both CPU kernels are vectorized (AVX512/AVX2) for bfloat16 inputs only; their fp32 versions are scalar loops,
  10-40x slower. So the kernel path rounds the layer's input to bf16 and gets a bf16 output back (accumulated in
  fp32 inside the kernel), which it widens to the input's dtype: a relative error of about 2^-8 per output, far
  below the 4- or 8-bit rounding of the weights (tests bound it; `dequantized_matmuls()` turns the kernels off,
  for a reference or to measure what they buy).
- `Int8Embedding`: int8 rows + per-row scale; a tied `lm_head` shares the same packed tensor.
- `LowRankLinear`: W ~= U @ V with U (N, r), V (r, K): two thin matmuls.

On disk (safetensors) int4 codes use the plain layout: byte j of row n holds column 2j in its low nibble
and column 2j+1 in its high nibble. The CPU kernel wants its own interleaved layout, so loading converts
and saving converts back (the permutation is read off the conversion op itself, see `_kernel_order`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.errors import UserError
from slmkit.models import native
from slmkit.models.decode_layout import FUSED_GROUPS, register_fused_call

log = logging.getLogger(__name__)

SPEC_KEY = "quantization_config"  # the key transformers uses for the same purpose
INFO_KEY = "slmkit_compression"  # informational record for methods that leave a plain dense model
FORMAT_VERSION = 1
# 2: int4 embeddings (a file slmkit versions before them could not load); files without them stay version 1
READ_FORMAT_VERSIONS = (1, 2)
KERNEL_GROUP_SIZES = (32, 64, 128, 256)
# Rows (batch x tokens) up to which Int8Linear uses the int8 kernel: measured per shape on a 2-core EPYC (1 thread),
# the kernel is 2-4x faster than fp32 at 1 row and level with widening at 16-64 rows, and slower beyond (it is a
# matrix-vector kernel; widening hands large inputs to MKL's GEMM).
INT8_KERNEL_MAX_ROWS = 32
# Rows up to which a tiled Int8Linear uses the native kernel (slmkit.models.native); above it the layer widens its
# weight for MKL's GEMM
NATIVE_INT8_MAX_ROWS = 32
_kernels = {"enabled": True}


@contextlib.contextmanager
def dequantized_matmuls():
    """Within the block, compressed layers skip the CPU kernels: each widens its weight to the input's dtype and
    calls F.linear (the reference the kernels are tested against; also what they are measured against)."""
    saved = _kernels["enabled"]
    _kernels["enabled"] = False
    try:
        yield
    finally:
        _kernels["enabled"] = saved


def kernels_enabled() -> bool:
    """False inside `dequantized_matmuls()` (the native decode step reads this too)."""
    return _kernels["enabled"]


# ---- int4 packing --------------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) integer codes in [0, 15] -> (N, K/2) uint8, low nibble = even column."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def int4_dequant(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Floats from 4-bit codes (..., K) with one scale and zero per group of `group_size` columns (..., K/g)."""
    return (codes - 8) * scales.repeat_interleave(group_size, -1) + zeros.repeat_interleave(group_size, -1)


@functools.lru_cache(maxsize=64)
def _kernel_order(n: int, k: int) -> torch.Tensor:
    """For each nibble of the CPU kernel's packed (N, K/2) layout, the flat index n*K+k it holds (int32).

    The op's layout is an implementation detail, so rather than hard-coding it we feed it the flat
    index of every position, 4 bits at a time, and read where each digit lands. The cache is cleared
    after each load (`load_compressed`): for a vocabulary-sized head it holds 4 bytes per weight.
    """
    tile = 32  # torch 2.13 packs blocks of 32 rows independently; checked here, not assumed
    if n > 2 * tile and n % tile == 0:
        base = _kernel_order(tile, k)
        if torch.equal(_kernel_order(2 * tile, k), torch.cat((base, base + tile * k))):
            starts = torch.arange(0, n * k, tile * k, dtype=torch.int32)
            return (starts[:, None] + base[None, :]).reshape(-1)
    flat = torch.arange(n * k, dtype=torch.int32).view(n, k)
    digits = max(1, ((n * k - 1).bit_length() + 3) // 4)
    order = torch.zeros(n * k, dtype=torch.int32)
    for d in range(digits):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((flat >> (4 * d)) & 0xF, 1)
        nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(-1)
        order |= nibbles.to(torch.int32) << (4 * d)
    return order


def _int4_kernel_ok(n: int, k: int, group_size: int, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        and group_size in KERNEL_GROUP_SIZES
        and n % 16 == 0
        and k % group_size == 0
    )


def _int8_kernel_ok(k: int) -> bool:
    # torch 2.13's CPU kernel reads K in vectors of 16 without a tail: other widths give garbage or crash
    return hasattr(torch.ops.aten, "_weight_int8pack_mm") and k % 16 == 0


def _aligned(t: torch.Tensor) -> bool:
    # torch 2.13's int8 kernel makes aligned 16-byte loads of the weight rows for inputs of several rows (it
    # crashes otherwise); tensors read from safetensors by mmap sit at any offset, so the loader copies them
    # (a fresh CPU allocation is 64-byte aligned)
    return t.data_ptr() % 64 == 0


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy in a fresh (64-byte aligned) allocation where t is not aligned."""
    return t if _aligned(t) else t.clone()


def _kernel_input(x: torch.Tensor) -> bool:
    """Whether x may take a CPU kernel: on CPU, fp32 or bf16, and no gradient to pass back (QLoRA adapters below
    the layer need one; the kernels have no backward)."""
    return (
        _kernels["enabled"]
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and not (x.requires_grad and torch.is_grad_enabled())
    )


def _native_input(x: torch.Tensor, rows_times_k: int) -> bool:
    """The native kernels' fast path: a decode-sized fp32 CPU input in an eager forward without gradients."""
    return (
        x.dtype is torch.float32
        and x.numel() <= rows_times_k
        and not torch.is_grad_enabled()
        and _kernels["enabled"]
        and not torch.compiler.is_compiling()
        and x.device.type == "cpu"
    )


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.view(-1, k) if x.is_contiguous() else x.reshape(-1, k).contiguous()


# ---- modules -------------------------------------------------------------------------------------
class _Int8Codes(nn.Module):
    """int8 codes (N, K) in `qweight` with an fp32 scale per row in `scales`; the codes may lie in memory in the
    native kernel's tiles (`tiled`, see slmkit.models.native) while the state dict keeps the row-major layout."""

    tiled = False
    qweight: torch.Tensor
    scales: torch.Tensor

    def _rows(self) -> int:
        raise NotImplementedError

    def codes(self, dtype: torch.dtype = torch.int8) -> torch.Tensor:
        """The (N, K) codes, row-major, as `dtype` (a new tensor where the module holds tiles or dtype is not int8)."""
        if self.tiled:
            return native.untile_int8(self.qweight, self._rows(), dtype)
        return self.qweight.to(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiled:
            destination[prefix + "qweight"] = self.codes()

    def _load_from_state_dict(self, state, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        key = prefix + "qweight"
        if self.tiled and key in state:
            codes = state[key]
            if codes.dim() != 2 or codes.shape[0] != self._rows() or codes.shape[1] % native.TILE_COLS:
                errors.append(f"{key}: shape {tuple(codes.shape)} does not match the layer's {self._rows()} rows")
                return
            with torch.no_grad():  # in place, so that a tied head and embedding keep sharing the tiles
                self.qweight.copy_(native.tile_int8(codes.to(self.qweight.device)))
            state = {**state, key: self.qweight}
        super()._load_from_state_dict(state, prefix, local_metadata, strict, missing, unexpected, errors)


class Int8Linear(_Int8Codes):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device="meta"))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, device="meta")) if bias else None
        self.packed: Any = None  # fbgemm/x86 packed weight for dynamic W8A8 (`prepack_dynamic`), or None
        self.use_kernel = _int8_kernel_ok(in_features)  # `_weight_int8pack_mm` for decode-sized inputs on CPU
        self._unit_scales: torch.Tensor | None = None

    def _rows(self) -> int:
        return self.out_features

    def tile(self) -> bool:
        """Lay the codes out in memory for the native int8 kernel (CPU, K a multiple of 32, the kernel built);
        False where it does not apply. The state dict, `codes()` and every other path are unchanged."""
        if self.tiled:
            return True
        if (
            self.qweight.device.type != "cpu"
            or self.in_features % native.TILE_COLS
            or self.packed is not None
            or not native.int8_available()
        ):
            return False
        self.qweight = native.tile_int8(self.qweight)
        self.tiled = True
        return True

    def prepack_dynamic(self) -> bool:
        """Build the CPU engine's packed weight from qweight and scales so that forward quantizes activations
        per call (W8A8 dynamic, as torch.ao's dynamic int8 does); False (weight-only path kept) where the
        quantized engine is not available. The int8 codes and scales are used as they are."""
        self.packed = None
        if self.qweight.device.type != "cpu" or torch.backends.quantized.engine not in ("x86", "fbgemm"):
            return False
        try:
            with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao
                warnings.simplefilter("ignore")
                zero = torch.zeros(self.out_features, dtype=torch.int64)
                weight = torch._make_per_channel_quantized_tensor(self.codes(), self.scales.double(), zero, 0)
                self.packed = torch.ops.quantized.linear_prepack(weight, None)
        except (RuntimeError, AttributeError) as exc:
            log.info("dynamic int8 not available (%s); weight-only int8 kept", exc)
            return False
        return True

    def _kernel_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        # the kernel takes bf16 scales; unit scales inside and the fp32 row scales applied to its output keep
        # the scales exact (only the input and the output are rounded to bf16)
        if not torch.compiler.is_compiling() and not _aligned(self.qweight):
            # the loader aligns every int8 weight; this covers modules filled another way (a compiled step
            # cannot read addresses, and relies on the loader)
            self.qweight = self.qweight.clone()
        if self._unit_scales is None or self._unit_scales.device != x2.device:
            self._unit_scales = torch.ones(self.out_features, dtype=torch.bfloat16, device=x2.device)
        y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self._unit_scales)
        return y.to(x2.dtype) * self.scales.to(x2.dtype)

    def _native_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        xf = x2.to(torch.float32).contiguous()
        if torch.compiler.is_compiling():
            y = torch.ops.slmkit.int8_linear(xf, self.qweight, self.scales, self.out_features)
        else:
            y = native.int8_linear(xf, self.qweight, self.scales, None, self.out_features)
        return y.to(x2.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if self.tiled and _native_input(x, NATIVE_INT8_MAX_ROWS * k):  # decoding: straight to the kernel
            b = self._buffers
            y = native.int8_linear(_rows(x, k), b["qweight"], b["scales"], None, n)
            if self.bias is not None:
                y += self.bias
            return y.view(*x.shape[:-1], n)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        fast = _kernel_input(x2)
        if self.packed is not None and fast and x2.dtype == torch.float32:
            # reduce_range: 7-bit activations, so that the x86 int8 dot products cannot saturate int16
            y = torch.ops.quantized.linear_dynamic(x2.contiguous(), self.packed, True)
        elif self.tiled and fast and x2.shape[0] <= NATIVE_INT8_MAX_ROWS and self.qweight.device.type == "cpu":
            y = self._native_matmul(x2)
        elif self.use_kernel and not self.tiled and fast and x2.shape[0] <= INT8_KERNEL_MAX_ROWS:
            y = self._kernel_matmul(x2)
        else:  # widen this one layer's int8 weight for the matmul; the model at rest stays int8
            y = F.linear(x2, self.codes(x2.dtype)) * self.scales.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)


class Int8Embedding(_Int8Codes):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device="meta"))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=torch.float32, device="meta"))

    def _rows(self) -> int:
        return self.num_embeddings

    def share_tiles(self, tiles: torch.Tensor) -> None:
        """Read rows from a tied head's tiles (the same codes, laid out for its kernel) instead of a copy."""
        self.qweight = tiles
        self.tiled = True

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = native.tiled_rows(self.qweight, idx) if self.tiled else F.embedding(idx, self.qweight)
        return rows.float() * self.scales[idx].unsqueeze(-1)


class Int4Embedding(nn.Module):
    """4-bit rows, asymmetric per group of `group_size` columns (the int4 layout on disk, kept as it is: a row
    gather unpacks only the rows it needs). A tied `lm_head` (an `Int4Linear`) shares these tensors."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int) -> None:
        super().__init__()
        if embedding_dim % group_size or embedding_dim % 2:
            raise ValueError(f"embedding_dim {embedding_dim} must be divisible by group_size {group_size} and by 2")
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        groups = embedding_dim // group_size
        self.register_buffer(
            "qweight", torch.empty(num_embeddings, embedding_dim // 2, dtype=torch.uint8, device="meta")
        )
        self.register_buffer("scales", torch.empty(num_embeddings, groups, dtype=torch.float16, device="meta"))
        self.register_buffer("zeros", torch.empty(num_embeddings, groups, dtype=torch.float16, device="meta"))

    def dequantize(self, rows: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `rows` (any shape of ids; all rows when None) as floats, shape (*rows.shape, embedding_dim)."""
        packed, scales, zeros = self.qweight, self.scales, self.zeros
        if rows is not None:
            packed, scales, zeros = packed[rows], scales[rows], zeros[rows]
        lead = packed.shape[:-1]
        codes = unpack_int4(packed.reshape(-1, packed.shape[-1])).view(*lead, self.embedding_dim).to(dtype)
        return int4_dequant(codes, scales.to(dtype), zeros.to(dtype), self.group_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.dequantize(idx)


class Int4Linear(nn.Module):
    """4-bit group-wise weights; see the module docstring for the layouts."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False) -> None:
        super().__init__()
        if in_features % group_size or in_features % 2:
            raise ValueError(f"in_features {in_features} must be divisible by group_size {group_size} and by 2")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.use_kernel = False
        self.tiled = False  # qweight holds the native kernel's tiles (`tile`), with their scales in native_sz
        self.native_sz: torch.Tensor | None = None
        # in-memory layout (the state dict is written by _save_to_state_dict in the plain layout)
        packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device="meta")
        self.register_buffer("qweight", packed, persistent=False)
        self.register_buffer(
            "scales_and_zeros", torch.empty(in_features // group_size, out_features, 2, device="meta"), persistent=False
        )
        # scales_and_zeros in bf16, the dtype of the kernel's vectorized version (set at load)
        self.register_buffer("kernel_scales_and_zeros", None, persistent=False)
        self.register_buffer("outlier_index", None, persistent=False)  # flat n*K+k
        self.register_buffer("outlier_value", None, persistent=False)
        self.bias = nn.Parameter(torch.empty(out_features, device="meta")) if bias else None

    # state dict <-> in-memory layout
    def _load_from_state_dict(self, state, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        names = ("qweight", "scales", "zeros")
        if self.bias is not None:
            if prefix + "bias" in state:
                self.bias = nn.Parameter(state[prefix + "bias"], requires_grad=False)
            else:
                missing.append(prefix + "bias")
        for name in names:
            if prefix + name not in state:
                missing.append(prefix + name)
        if any(prefix + n not in state for n in names):
            return
        packed = state[prefix + "qweight"]
        scales = state[prefix + "scales"].float()  # (N, G)
        zeros = state[prefix + "zeros"].float()
        n, k, g = self.out_features, self.in_features, self.group_size
        if packed.shape != (n, k // 2) or scales.shape != (n, k // g) or zeros.shape != (n, k // g):
            errors.append(f"{prefix}: int4 tensors do not match a ({n}, {k}) layer with group size {g}")
            return
        self.scales_and_zeros = torch.stack((scales.t(), zeros.t()), dim=-1).contiguous()  # (G, N, 2)
        was_tiled, self.tiled, self.native_sz = self.tiled, False, None
        self.use_kernel = _int4_kernel_ok(n, k, g, packed.device)
        self.kernel_scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16) if self.use_kernel else None
        if self.use_kernel:
            codes = unpack_int4(packed).reshape(-1)
            order = _kernel_order(n, k)
            nibbles = codes[order].view(n, k // 2, 2)
            self.qweight = (nibbles[..., 0] | (nibbles[..., 1] << 4)).contiguous()
        else:
            self.qweight = packed.contiguous()
        if was_tiled:  # a state loaded into a model laid out for the native kernel is laid out the same way
            self.tile()
        if prefix + "outlier_index" in state:
            self.outlier_index = state[prefix + "outlier_index"].to(torch.int64)
            self.outlier_value = state[prefix + "outlier_value"].float()
        for key in state:
            rest = key[len(prefix) :]
            if rest.split(".", 1)[0] in self._modules:  # a child's (an adapter's factors): loaded by the child
                continue
            if key.startswith(prefix) and rest not in (*names, "outlier_index", "outlier_value", "bias"):
                unexpected.append(key)
            elif rest == "bias" and key.startswith(prefix) and self.bias is None:
                unexpected.append(key)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "qweight"] = self.plain_packed()
        destination[prefix + "scales"] = self.scales_and_zeros[..., 0].t().half().contiguous()
        destination[prefix + "zeros"] = self.scales_and_zeros[..., 1].t().half().contiguous()
        if self.outlier_index is not None:
            destination[prefix + "outlier_index"] = self.outlier_index.to(torch.int32)
            destination[prefix + "outlier_value"] = self.outlier_value.half()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def tile(self) -> bool:
        """Lay the codes out in memory for the native int4 kernel (CPU, groups and K multiples of 32, an AVX-512
        build); False where it does not apply. The state dict and every other path are unchanged; prefill-sized
        inputs then widen the layer (torch's int4 kernel needs its own layout, and one copy is kept)."""
        if self.tiled:
            return True
        if (
            self.qweight.device.type != "cpu"
            or self.group_size % native.TILE_COLS
            or self.in_features % native.TILE_COLS
            or not native.int4_available()
        ):
            return False
        scales, zeros = self.scales_and_zeros[..., 0].t(), self.scales_and_zeros[..., 1].t()  # (N, G)
        self.qweight, self.native_sz = native.tile_int4(self.codes(), scales, zeros, self.group_size)
        self.tiled, self.use_kernel, self.kernel_scales_and_zeros = True, False, None
        return True

    def codes(self) -> torch.Tensor:
        """The (N, K) uint8 codes in [0, 15], row-major."""
        if self.tiled:
            return native.untile_int4(self.qweight, self.out_features)
        return unpack_int4(self.plain_packed())

    def plain_packed(self) -> torch.Tensor:
        if self.tiled:
            return pack_int4(self.codes())
        if not self.use_kernel:
            return self.qweight
        n, k = self.out_features, self.in_features
        nibbles = unpack_int4(self.qweight).reshape(-1)
        codes = torch.empty_like(nibbles)
        codes[_kernel_order(n, k)] = nibbles
        return pack_int4(codes.view(n, k))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes().to(dtype)  # (N, K)
        scales, zeros = self.scales_and_zeros[..., 0].t().to(dtype), self.scales_and_zeros[..., 1].t().to(dtype)
        weight = int4_dequant(codes, scales, zeros, self.group_size)
        if self.outlier_index is not None:
            weight.view(-1).index_add_(0, self.outlier_index, self.outlier_value.to(dtype))
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if self.tiled and self.outlier_index is None and _native_input(x, NATIVE_INT8_MAX_ROWS * k):
            y = native.int4_linear(_rows(x, k), self._buffers["qweight"], self.native_sz, n, self.group_size)
            if self.bias is not None:
                y += self.bias
            return y.view(*x.shape[:-1], n)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.tiled and _kernel_input(x2) and x2.shape[0] <= NATIVE_INT8_MAX_ROWS and x2.device.type == "cpu":
            xf = x2.to(torch.float32).contiguous()
            n, g = self.out_features, self.group_size
            if torch.compiler.is_compiling():
                y = torch.ops.slmkit.int4_linear(xf, self.qweight, self.native_sz, n, g)
            else:
                y = native.int4_linear(xf, self.qweight, self.native_sz, n, g)
            y = y.to(x2.dtype)
            if self.outlier_index is not None:
                rows = self.outlier_index // self.in_features
                cols = self.outlier_index % self.in_features
                y = y.index_add(1, rows, x2[:, cols] * self.outlier_value.to(x2.dtype))
        elif self.use_kernel and _kernel_input(x2):
            sz = self.kernel_scales_and_zeros
            if sz is None or sz.device != x2.device:
                sz = self.kernel_scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16).contiguous(), self.qweight, self.group_size, sz
            ).to(x2.dtype)
            if self.outlier_index is not None:
                rows = self.outlier_index // self.in_features
                cols = self.outlier_index % self.in_features
                y = y.index_add(1, rows, x2[:, cols] * self.outlier_value.to(x2.dtype))
        else:
            y = F.linear(x2, self.dequantize(x2.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)


class LowRankLinear(nn.Module):
    """y = x @ (U @ V)^T computed as two thin matmuls; U (N, r), V (r, K)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight_v = nn.Parameter(torch.empty(rank, in_features, device="meta"))
        self.weight_u = nn.Parameter(torch.empty(out_features, rank, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, device="meta")) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_v), self.weight_u, self.bias)


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """The float weight a compressed layer stands for (None for any other module)."""
    if isinstance(module, (Int8Linear, Int8Embedding)):
        return module.codes().float() * module.scales.float()[:, None]
    if isinstance(module, Int4Linear):
        return module.dequantize(torch.float32)
    if isinstance(module, Int4Embedding):
        return module.dequantize()
    if isinstance(module, LowRankLinear):
        return (module.weight_u @ module.weight_v).float()
    return None


def weight_count(model: nn.Module) -> int:
    """Weights the model's matrices stand for, compressed or not: its parameters plus in x out of each compressed
    layer (whose packed tensors are buffers); a tied head is counted once, as `parameters()` counts it."""
    tied = bool(getattr(getattr(model, "config", None), "tie_embeddings", False))
    count = sum(p.numel() for p in model.parameters())
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)) and not (tied and name == "lm_head"):
            count += module.in_features * module.out_features
        elif isinstance(module, (Int8Embedding, Int4Embedding)):
            count += module.num_embeddings * module.embedding_dim
    return count


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every compressed layer's tensors replaced by its float `weight`
    (the names a float model of the same config has); a float model's state dict as it is."""
    state = model.state_dict()
    for name, module in model.named_modules():
        weight = dense_weight(module)
        if weight is None:
            continue
        prefix = name + "."
        for key in [k for k in state if k.startswith(prefix) and "." not in k[len(prefix) :]]:
            if key != prefix + "bias":
                del state[key]
        state[prefix + "weight"] = weight
    return state


# ---- the spec and the loader ---------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def swap_modules(model: nn.Module, spec: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Replace the layers `spec` names with their compressed modules (on the meta device)."""
    method = spec.get("method")
    for name in spec.get("modules", []):
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise UserError(f"{SPEC_KEY}: {name} is not a linear layer of this model")
        bias = old.bias is not None
        if method == "int8":
            new: nn.Module = Int8Linear(old.in_features, old.out_features, bias)
        elif method == "int4":
            group_size = (spec.get("group_sizes") or {}).get(name, spec["group_size"])
            new = Int4Linear(old.in_features, old.out_features, int(group_size), bias)
        elif method == "lowrank":
            key = name + ".weight_u"
            if key not in state:
                raise UserError(f"{SPEC_KEY}: low-rank factor {key} missing from the weights")
            new = LowRankLinear(old.in_features, old.out_features, state[key].shape[1], bias)
        else:
            raise UserError(f"{SPEC_KEY}: unknown method {method!r} (this slmkit knows int8, int4, lowrank)")
        _set_module(model, name, new)
    emb, head = model.embed_tokens, model.lm_head
    if spec.get("embeddings") == "int8":
        model.embed_tokens = Int8Embedding(emb.num_embeddings, emb.embedding_dim)
        model.lm_head = Int8Linear(head.in_features, head.out_features)
    elif spec.get("embeddings") == "int4":
        g = int(spec["embeddings_group_size"])
        model.embed_tokens = Int4Embedding(emb.num_embeddings, emb.embedding_dim, g)
        model.lm_head = Int4Linear(head.in_features, head.out_features, g)
    elif spec.get("embeddings") is not None:
        raise UserError(f"{SPEC_KEY}: embeddings {spec['embeddings']!r} unknown (this slmkit knows int8, int4)")


def read_spec(config: Any) -> dict[str, Any] | None:
    spec = config.extra.get(SPEC_KEY)
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("quant_method") != "slmkit":
        raise UserError(
            f"config.json: {SPEC_KEY} {json.dumps(spec)[:80]} is not an slmkit compression spec; "
            "only models compressed by `slm compress` can be loaded with it"
        )
    if spec.get("format_version") not in READ_FORMAT_VERSIONS:
        raise UserError(f"config.json: {SPEC_KEY} format_version {spec.get('format_version')!r} is not supported")
    return spec


def _tiles_in_huge_pages(model: nn.Module) -> None:
    """Move every layer's native-kernel tiles into one allocation backed by huge pages (`native.huge_empty`: the
    kernels stream faster from them); modules sharing tiles (a tied int8 head and embedding) keep sharing them."""
    owners: dict[int, list[nn.Module]] = {}  # one entry per tiles tensor, in module order (q, k, v back to back)
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int8Embedding, Int4Linear)) and module.tiled:
            owners.setdefault(id(module.qweight), []).append(module)
    if not owners:
        return
    arena, slots = native.huge_slots([(group[0].qweight.shape, group[0].qweight.dtype) for group in owners.values()])
    for group, slot in zip(owners.values(), slots, strict=True):
        slot.copy_(group[0].qweight)
        for module in group:
            module.qweight = slot
    for module in model.modules():
        for names in FUSED_GROUPS:
            _fuse_tiled(module, names, arena)


def _fuse_tiled(module: nn.Module, names: tuple[str, ...], arena: torch.Tensor) -> None:
    """Register one kernel call for `module`'s linears `names` (q/k/v, gate/up) where they are tiled layers of one
    kind lying back to back in `arena` (as the huge-page move leaves them): their tiles are read as one matrix and
    their scales become views of one tensor (so an in-place change of either reaches the fused call)."""
    linears = [module._modules.get(name) for name in names]
    first = linears[0]
    if not isinstance(first, (Int8Linear, Int4Linear)) or not all(type(m) is type(first) for m in linears):
        return
    if any(m.bias is not None or not m.tiled or m.in_features != first.in_features for m in linears):  # type: ignore[union-attr]
        return
    if isinstance(first, Int4Linear) and any(
        m.outlier_index is not None or m.group_size != first.group_size
        for m in linears  # type: ignore[union-attr]
    ):
        return
    tiles = [m.qweight for m in linears]  # type: ignore[union-attr]
    if any(m.out_features % native.TILE_ROWS for m in linears):  # type: ignore[union-attr]
        return
    for a, b in zip(tiles, tiles[1:], strict=False):
        if a.data_ptr() + a.numel() * a.element_size() != b.data_ptr():
            return
    start = tiles[0].data_ptr() - arena.data_ptr()
    total_bytes = sum(t.numel() * t.element_size() for t in tiles)
    fused_tiles = arena[start : start + total_bytes].view(tiles[0].dtype).view(-1, *tiles[0].shape[1:])
    n, k = sum(m.out_features for m in linears), first.in_features  # type: ignore[union-attr]
    name = "scales" if isinstance(first, Int8Linear) else "native_sz"  # what the kernel reads beside the tiles
    parts = [getattr(m, name) for m in linears]
    scales = torch.cat(parts)
    for m, view in zip(linears, scales.split([p.shape[0] for p in parts]), strict=True):
        setattr(m, name, view)
    group = first.group_size if isinstance(first, Int4Linear) else 0

    def pointers_now() -> tuple[int, ...]:  # _buffers and __dict__ directly: this runs on every decode step
        if group == 0:
            return tuple(m._buffers[key].data_ptr() for m in linears for key in ("qweight", "scales"))  # type: ignore[union-attr]
        return tuple(t.data_ptr() for m in linears for t in (m._buffers["qweight"], m.__dict__["native_sz"]))  # type: ignore[union-attr]

    pointers = pointers_now()

    def call(x: torch.Tensor) -> torch.Tensor | None:
        if not _native_input(x, NATIVE_INT8_MAX_ROWS * k):
            return None
        if pointers_now() != pointers or any(m._forward_hooks or m._forward_pre_hooks for m in linears):  # type: ignore[union-attr]
            return None  # re-laid or reloaded since, or adapted (LoRA hooks): the linears one by one
        if group:
            y = native.int4_linear(_rows(x, k), fused_tiles, scales, n, group)
        else:
            y = native.int8_linear(_rows(x, k), fused_tiles, scales, None, n)
        return y.view(*x.shape[:-1], n)

    register_fused_call(module, call)


def load_compressed(
    directory: Path, config: Any, state: dict[str, torch.Tensor], device: str | torch.device, dtype: torch.dtype | None
) -> nn.Module:
    """Build a model whose compressed layers stay packed, and load `state` (our names) into it."""
    from slmkit.models import build_model

    spec = read_spec(config)
    assert spec is not None
    with torch.device("meta"):
        model = build_model(config)
    swap_modules(model, spec, state)
    target_dtype = dtype or torch.float32
    moved = {}
    for key, tensor in state.items():
        tensor = tensor.to(device)
        if tensor.is_floating_point() and not key.endswith(("scales", "zeros", "outlier_value")):
            tensor = tensor.to(target_dtype)
        moved[key] = tensor
    for key, tensor in moved.items():
        if key.endswith(".qweight") and tensor.dtype == torch.int8:
            moved[key] = aligned(tensor)  # for the CPU int8 kernel (see `_aligned`)
    tied = config.tie_embeddings
    if tied:
        for key in [k for k in moved if k.startswith("lm_head.")]:
            moved.pop(key)
    result = model.load_state_dict(moved, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (tied and k.startswith("lm_head."))]
    if missing or result.unexpected_keys:
        raise UserError(
            f"{directory}: weights do not match config.json and its {SPEC_KEY} "
            f"(missing {missing[:4]}, unexpected {result.unexpected_keys[:4]})"
        )
    if tied:
        emb, head = model.embed_tokens, model.lm_head
        if isinstance(head, Int8Linear):
            head.qweight, head.scales = emb.qweight, emb.scales
            if head.tile():  # one tiled copy of the codes serves both (the kernel's layout)
                emb.share_tiles(head.qweight)
        elif isinstance(head, Int4Linear):
            # the CPU int4 kernel needs its own interleaved copy (0.5 byte per weight more in memory, same file);
            # without the kernel the head shares the embedding's packed rows
            rows = {"qweight": emb.qweight, "scales": emb.scales, "zeros": emb.zeros}
            errors: list[str] = []
            head._load_from_state_dict(
                {"lm_head." + k: v for k, v in rows.items()}, "lm_head.", {}, True, [], [], errors
            )
            if errors:
                raise UserError(f"{directory}: {errors[0]}")
            if not head.use_kernel:
                head.qweight = emb.qweight
        else:
            model.lm_head.weight = model.embed_tokens.weight
    for name, buf in list(model.named_buffers()) + list(model.named_parameters()):
        if buf.device.type == "meta":
            raise UserError(f"{directory}: tensor {name} was not in the weights file")
    _kernel_order.cache_clear()
    if spec.get("activations", "none") != "dynamic":
        for module in model.modules():
            if isinstance(module, (Int8Linear, Int4Linear)):
                module.tile()
        _tiles_in_huge_pages(model)
    else:
        layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
        done = sum(m.prepack_dynamic() for m in layers)
        if done < len(layers):
            log.info("dynamic int8 activations: %d of %d layers packed; the rest stay weight-only", done, len(layers))
    model.eval()
    model.compression = spec  # type: ignore[attr-defined]
    return model
