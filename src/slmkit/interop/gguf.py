"""Export a model directory to one GGUF file that llama.cpp, llama-cpp-python and ollama load.

What goes in: metadata (architecture, context, widths, heads, rope, norm epsilon, file type), the
tokenizer as a `gpt2` (byte-level BPE) vocabulary with merges and special tokens, and every tensor
under the name llama.cpp expects (names come from the `gguf` package's own tables).

Layout differences we handle (learned from llama.cpp's `convert_hf_to_gguf.py`):
- llama.cpp's `llama` architecture rotates interleaved pairs (x0, x1), (x2, x3) ... while Hugging Face
  rotates halves (x_i, x_{i + D/2}); so q and k rows (and biases) are permuted per head. Qwen2/Qwen3 use
  llama.cpp's NeoX rope (halves), so they are written as they are.
- llama3 rope scaling becomes a `rope_freqs` tensor of per-frequency divisors; yarn becomes llama.cpp's
  `rope.scaling.*` keys (type, factor, original context, an attention factor when not the default).
- GPT-2 keeps a fused q/k/v matrix (`attn_qkv`) and an explicit `output` copy of the embedding.
- A mixture of experts stores each layer's experts stacked, one (n_expert, out, in) tensor per projection
  (`ffn_{gate,up,down}_exps`), beside the router (`ffn_gate_inp`) and Qwen2-MoE's shared expert
  (`ffn_*_shexp`, its gate `ffn_gate_inp_shexp`); routers stay f32 in quantized files, as llama.cpp's
  quantize tool keeps them.
- Mamba-1 and Mamba-2 store A as -exp(A_log) and the conv squeezed (Mamba-2 also its norm per group), and
  `ssm` metadata in place of the attention keys: the layout's `parameters`, `convert`, `keep_f32`, `hparams`.
- Bamba runs as llama.cpp's `granitehybrid`: Mamba-2 layers as above beside attention layers (a per-layer
  `head_count_kv` of 0 marks a Mamba-2 layer) whose rotary turns only part of each head, so only those rows of q
  and k are permuted.
Which of these applies to a family, and its llama.cpp architecture, is its spec's `gguf` layout
(`slmkit.interop.families`).

The file is written under a temporary name beside the target and renamed at the end, so a failure
never leaves a partial `.gguf` behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmkit.errors import UserError
from slmkit.interop.families import family_spec

if TYPE_CHECKING:
    import numpy as np
    import torch

    from slmkit.config import ModelConfig, RopeScaling

log = logging.getLogger(__name__)

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m")

# pre-tokenizer regexes of tokenizer.json -> llama.cpp's name for that pre-tokenizer
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_BY_REGEX = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


# ---- tokenizer ------------------------------------------------------------------------------------
def _pre_tokenizer_name(pre: dict[str, Any] | None, source: Path) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer`; UserError if unknown."""

    def is_byte_level(p: dict[str, Any], regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex

    if pre is not None and is_byte_level(pre, regex=True):
        return "gpt-2"
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        first, second = steps
        if first.get("type") == "Digits" and first.get("individual_digits") and is_byte_level(second, regex=True):
            return "smollm"
        pattern = (first.get("pattern") or {}).get("Regex")
        if first.get("type") == "Split" and pattern in _PRE_BY_REGEX and is_byte_level(second, regex=False):
            return _PRE_BY_REGEX[pattern]
    raise UserError(
        f"{source}: pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp knows how to reproduce "
        "(supported: GPT-2 byte-level, Llama 3, Qwen2, SmolLM); GGUF export would tokenize differently"
    )


def read_bpe_vocab(path: Path, vocab_size: int) -> dict[str, Any]:
    """tokens, token types, merges and pre-tokenizer name of a byte-level BPE tokenizer.json."""
    import gguf

    try:
        spec = json.loads(path.read_text())
        model = spec["model"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a readable tokenizer.json ({exc})") from None
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise UserError(
            f"{path}: GGUF export needs a byte-level BPE tokenizer (model BPE, decoder ByteLevel); "
            f"this one is model {model.get('type')!r}, decoder {decoder!r}"
        )
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), path)
    by_id: dict[int, tuple[str, int]] = {i: (tok, gguf.TokenType.NORMAL) for tok, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise UserError(
            f"{path}: tokenizer has token id {max(by_id)} but the model's vocabulary is {vocab_size}; "
            "tokenizer and model do not belong together"
        )
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may be padded past the tokenizer (e.g. to a multiple of 64)
        token, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(token)
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre}


# ---- tensors --------------------------------------------------------------------------------------
def permute_for_llama_cpp(weight: torch.Tensor, n_heads: int, rope_dim: int | None = None) -> torch.Tensor:
    """Rows of a q/k projection (or its bias), per head, from rotate-half to interleaved-pair order. With `rope_dim`
    below the head width (partial rotary, as Bamba's), only each head's first `rope_dim` rows are turned, so only
    those are reordered; the rest keep their place (llama.cpp's rope passes channels past n_rot through)."""
    import torch

    rest = weight.shape[1:]
    heads = weight.reshape(n_heads, weight.shape[0] // n_heads, *rest)
    turned = heads.shape[1] if rope_dim is None else rope_dim
    pairs = heads[:, :turned].reshape(n_heads, 2, turned // 2, *rest).transpose(1, 2).reshape(n_heads, turned, *rest)
    return torch.cat([pairs, heads[:, turned:]], dim=1).reshape(weight.shape)


def llama3_rope_divisors(config: ModelConfig) -> torch.Tensor:
    """Per-frequency divisors of the base frequencies that reproduce llama3 rope scaling in llama.cpp."""
    from slmkit.models.transformer import rope_inv_freq

    plain = rope_inv_freq(config.replace(rope_scaling=None), 0)
    return (plain / rope_inv_freq(config, 0)).float()


def gguf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF file, named as llama.cpp names it, in fp32, in llama.cpp's layout.

    Layers of an slmkit-compressed model (int8, int4, low-rank) come out dequantized."""
    return _layout(model.config, _float_state(model))  # type: ignore[arg-type]


def _float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in fp32 on the CPU, compressed layers dequantized."""
    from slmkit.models.quantized import dense_state_dict

    return {k: v.detach().float().cpu() for k, v in dense_state_dict(model).items()}


def _layout(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> llama.cpp's names and layout. Only row operations (row permutations, concatenation
    of rows), so tensors with trailing dimensions beyond the weight's own go through unchanged per row."""
    import gguf
    import torch

    layout = family_spec(cfg.family).gguf
    names, t = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    out: dict[str, torch.Tensor] = {names[t.TOKEN_EMBD] + ".weight": state["embed_tokens.weight"]}
    if cfg.positions == "learned":
        out[names[t.POS_EMBD] + ".weight"] = state["embed_positions.weight"]
    if cfg.rope_scaling is not None and cfg.rope_scaling.type == "llama3":
        out[names[t.ROPE_FREQS] + ".weight"] = llama3_rope_divisors(cfg)
    for suffix in ("weight", "bias"):
        if f"norm.{suffix}" in state:
            out[names[t.OUTPUT_NORM] + f".{suffix}"] = state[f"norm.{suffix}"]
    if not cfg.tie_embeddings or layout.explicit_output:
        out[names[t.OUTPUT] + ".weight"] = state["lm_head.weight"]
    # rows of q and k, per head, from rotate-half to the interleaved pairs llama.cpp's `llama` rotates
    permuted = {"self_attn.q_proj": cfg.n_heads, "self_attn.k_proj": cfg.n_kv_heads} if layout.rope_pairs else {}
    for i in range(cfg.n_layers):
        layer = {k.removeprefix(f"layers.{i}."): v for k, v in state.items() if k.startswith(f"layers.{i}.")}
        for fused, parts in layout.fused.items():
            for suffix in ("weight", "bias"):
                if f"{parts[0]}.{suffix}" in layer:
                    layer[f"{fused}.{suffix}"] = torch.cat([layer.pop(f"{part}.{suffix}") for part in parts])
        _stack_experts(layer, cfg)
        for name, tensor in layer.items():
            if name in layout.convert:
                tensor = layout.convert[name](tensor)
            if name in layout.parameters:  # a bare parameter (an SSM's A, D, dt bias): llama.cpp's own name
                member, _, suffix = layout.parameters[name].partition(".")
                out[names[t[member]].format(bid=i) + (f".{suffix}" if suffix else "")] = tensor
                continue
            module, _, suffix = name.rpartition(".")
            if module in permuted:
                tensor = permute_for_llama_cpp(tensor, permuted[module], cfg.rope_dim)
            out[names[t[layout.tensors[module]]].format(bid=i) + f".{suffix}"] = tensor
    return out


def _stack_experts(layer: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """In place: a mixture of experts' `mlp.experts.{e}.{proj}.weight` -> one `mlp.experts.{proj}.weight` of
    shape (E, out, in) per projection, expert e at index e (llama.cpp's `ffn_*_exps`)."""
    import torch

    if "mlp.experts.0.gate_proj.weight" not in layer:  # a dense layer (Jamba mixes both)
        return
    for proj in ("gate_proj", "up_proj", "down_proj"):
        experts = [layer.pop(f"mlp.experts.{e}.{proj}.weight") for e in range(cfg.moe_experts)]
        layer[f"mlp.experts.{proj}.weight"] = torch.stack(experts)


def _is_router(name: str) -> bool:
    """A router's weight (ffn_gate_inp, Qwen2-MoE's ffn_gate_inp_shexp): kept f32, where routing is decided."""
    return ".ffn_gate_inp" in name


def _add_expert_metadata(writer: Any, cfg: ModelConfig) -> None:
    """llama.cpp's expert keys: count, used count, and the routed and shared experts' widths."""
    if cfg.mlp != "moe":
        return
    writer.add_expert_count(cfg.moe_experts)
    writer.add_expert_used_count(cfg.moe_top_k)
    writer.add_expert_feed_forward_length(cfg.d_ff)
    if cfg.moe_shared_d_ff:
        writer.add_expert_shared_feed_forward_length(cfg.moe_shared_d_ff)


def _f32_names(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> set[str]:
    """The tensors the family's layout keeps in f32 at every file type (`GGUFLayout.keep_f32`)."""
    import gguf

    layout = family_spec(cfg.family).gguf
    stems = {
        gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[m]].format(bid=i) for m in layout.keep_f32 for i in range(cfg.n_layers)
    }
    return {n for n in tensors if n in stems or n.rpartition(".")[0] in stems}


# ---- tensor types ---------------------------------------------------------------------------------
BLOCK_DTYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # what the `gguf` package can quantize itself
_LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")
# K-quant file types (slmkit.interop.kquants packs the blocks): one type for every matrix, or llama.cpp's _M mixtures
K_DTYPES = ("q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m")
_K_BASE = {"q4_k": "q4_k", "q5_k": "q5_k", "q6_k": "q6_k", "q4_k_m": "q4_k", "q5_k_m": "q5_k"}
# llama.cpp's tensor_type_fallback for rows that are not a multiple of a 256-weight super-block
_K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
_ATTN_V_LIKE = ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight")  # llama.cpp's category_is_attn_v


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer_of(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


class _KMixture:
    """llama.cpp's llama_tensor_get_type for the K-quant file types (llama-quant.cpp, no imatrix, no overrides).

    q4_k, q5_k, q6_k: every matrix in that type, the output head (the tied embedding) q6_k. q4_k_m / q5_k_m (default
    q4_k / q5_k): the head q6_k; attn_v (GPT-2's fused attn_qkv) q6_k on the layers `_more_bits` picks, counted
    over the attn_v tensors in llama.cpp's order; ffn_down (experts' and shared expert's too) q6_k on the layers it
    picks; with 8 experts (Mixtral), attn_v and attn_k q8_0 and, in q4_k_m, attn_output q5_k."""

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: str):
        self.dtype, self.base = dtype, _K_BASE[dtype]
        self.mixture = dtype.endswith("_m")
        self.n_layers = 1 + max((_layer_of(n) for n in tensors), default=-1)
        # llama.cpp visits tensors by layer, then by name; its attn_v counter follows that order
        attn_v = sorted((n for n in tensors if any(k in n for k in _ATTN_V_LIKE)), key=lambda n: (_layer_of(n), n))
        self.attn_v_index = {n: i for i, n in enumerate(attn_v)}
        experts = [t.shape[0] for n, t in tensors.items() if "_exps." in n and t.dim() == 3]
        self.n_experts = experts[0] if experts else 0

    def choose(self, name: str, tensor: torch.Tensor, head: str) -> tuple[str, str | None]:
        if name == head:
            if tensor.shape[-1] % 256:
                return "q8_0", f"output head, rows of {tensor.shape[-1]} (not a multiple of 256): q8_0 as llama.cpp"
            return "q6_k", None if self.base == "q6_k" else "output head at q6_k, as llama.cpp does"
        if not self.mixture:
            return self.base, None
        rule = f"llama.cpp's {self.dtype.upper()} rule"
        if name in self.attn_v_index:
            if self.n_experts == 8:
                return "q8_0", f"attn_v of an 8-expert model: q8_0 ({rule})"
            i, n = self.attn_v_index[name], len(self.attn_v_index)
            if _more_bits(i, n):
                return "q6_k", f"attn_v {i} of {n}: more bits ({rule})"
        elif "attn_k.weight" in name and self.n_experts == 8:
            return "q8_0", f"attn_k of an 8-expert model: q8_0 ({rule})"
        elif "ffn_down" in name and _more_bits(_layer_of(name), self.n_layers):
            return "q6_k", f"ffn_down of layer {_layer_of(name)} of {self.n_layers}: more bits ({rule})"
        elif "attn_output.weight" in name and self.n_experts == 8 and self.dtype == "q4_k_m":
            return "q5_k", f"attn_output of an 8-expert model: q5_k ({rule})"
        return self.base, None


def _fit_rows(kind: str, why: str | None, width: int) -> tuple[str, str | None]:
    """llama.cpp's fallbacks for rows that do not split into the type's blocks: a K-quant to its 32-block
    neighbour (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0), a 32-block type to f16."""
    if kind in _K_FALLBACK and width % 256:
        kind, why = _K_FALLBACK[kind], f"row length {width} is not a multiple of the {kind} super-block (256)"
    if kind in BLOCK_DTYPES and width % 32:
        why = f"row length {width} is not a multiple of the {kind} block (32)"
        kind = "f16"
    return kind, why


def _qtype(dtype: str) -> Any:
    import gguf

    return getattr(gguf.GGMLQuantizationType, dtype.upper())


def tensor_types(
    tensors: dict[str, torch.Tensor], dtype: str, keep_f32: set[str] | frozenset[str] = frozenset()
) -> dict[str, tuple[str, str | None]]:
    """name -> (GGUF type, why it differs from `dtype` or None), following llama.cpp's quantize tool:
    1-D tensors (norms, biases, rope divisors), `*_norm.weight` and the learned position embedding stay f32;
    the output matrix (the token embedding where the head is tied to it) is kept at 8 bits in q4_0/q4_1/q5_0/q5_1
    files (llama.cpp's tool uses q6_k there, or q8_0 where the row length is not a multiple of 256; these files keep
    their earlier q8_0 head) and at q6_k in K-quant files; K-quant files follow llama.cpp's tensor rules
    (`_KMixture`); the token embedding of an untied model takes the file's type; a matrix whose row length is not
    a multiple of the block size falls back as llama.cpp's does (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0, a
    32-block type -> f16); `keep_f32` names tensors the family's layout keeps in f32 (an SSM's conv, A, D and
    time-step projections)."""
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    mixture = _KMixture(tensors, dtype) if dtype in K_DTYPES else None
    types: dict[str, tuple[str, str | None]] = {}
    for name, tensor in tensors.items():
        if (
            tensor.dim() < 2
            or name.endswith("_norm.weight")
            or name in ("position_embd.weight", "rope_freqs.weight")
            or name in keep_f32
        ):
            types[name] = ("f32", None)
            continue
        if _is_router(name):
            types[name] = ("f32", None if dtype == "f32" else "a router stays f32, as llama.cpp's quantize keeps it")
            continue
        kind, why = dtype, None
        if mixture is not None:
            kind, why = mixture.choose(name, tensor, head)
        elif name == head and dtype in _LOW_BIT:
            kind, why = "q8_0", "output head kept at 8 bits, as llama.cpp does"
        types[name] = _fit_rows(kind, why, tensor.shape[-1])
    return types


def exact_blocks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The codes of an slmkit-quantized model's layers, for writing them without rounding twice: int8 per row
    -> q8_0 (the same codes, the row scale as each block's fp16 scale); int4 with groups a multiple of 32 and
    no outliers -> q4_1 (the same codes, scale -> d, zero - 8 * scale -> m). Our name -> (N, K, 4) tensor of
    (code, scale, offset, bits) per weight; bits is 8, 4, or -4 for int4 layers no block type holds exactly."""
    import torch

    from slmkit.models.quantized import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear, unpack_int4

    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int8Embedding)):
            codes = module.codes().float().cpu()
            scale = module.scales.float().cpu()[:, None].expand_as(codes)
            offset, bits = torch.zeros_like(codes), 8.0
        elif isinstance(module, Int4Linear):
            g = module.group_size
            codes = unpack_int4(module.plain_packed()).float().cpu()
            scale = module.scales_and_zeros[..., 0].t().float().cpu().repeat_interleave(g, dim=1)
            offset = module.scales_and_zeros[..., 1].t().float().cpu().repeat_interleave(g, dim=1) - 8 * scale
            bits = 4.0 if g % 32 == 0 and module.outlier_index is None else -4.0
        elif isinstance(module, Int4Embedding):
            g = module.group_size
            codes = unpack_int4(module.qweight).float().cpu()
            scale = module.scales.float().cpu().repeat_interleave(g, dim=1)
            offset = module.zeros.float().cpu().repeat_interleave(g, dim=1) - 8 * scale
            bits = 4.0 if g % 32 == 0 else -4.0
        else:
            continue
        out[name + ".weight"] = torch.stack((codes, scale, offset, torch.full_like(codes, bits)), dim=-1)
    return out


def exact_kind(exact: torch.Tensor) -> str | None:
    """q8_0 or q4_1 for codes that block type holds as they are; None where none does."""
    return {8: "q8_0", 4: "q4_1"}.get(int(exact[0, 0, 3].item()))


def _encode_exact(exact: torch.Tensor, kind: str) -> np.ndarray:
    """(N, K, 4) codes/scale/offset/bits -> the q8_0 or q4_1 blocks of those codes, as bytes (N, K/32 * size)."""
    import numpy as np

    codes, scale, offset = (exact[..., i].numpy() for i in range(3))
    if exact_kind(exact) != kind:
        raise ValueError(f"codes of {exact_kind(exact)} cannot be written as {kind}")
    n, k = codes.shape
    d = scale[:, ::32].astype(np.float16).view(np.uint8).reshape(n, k // 32, 2)
    if kind == "q8_0":
        qs = codes.astype(np.int8).view(np.uint8).reshape(n, k // 32, 32)
        return np.concatenate([d, qs], axis=-1).reshape(n, -1)
    m = offset[:, ::32].astype(np.float16).view(np.uint8).reshape(n, k // 32, 2)
    q = codes.astype(np.uint8).reshape(n, k // 32, 2, 16)  # byte j of a block: element j low, j + 16 high
    qs = q[:, :, 0, :] | (q[:, :, 1, :] << np.uint8(4))
    return np.concatenate([d, m, qs], axis=-1).reshape(n, -1)


def _encode(tensor: torch.Tensor, kind: str, exact: torch.Tensor | None = None) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype or None) for GGUFWriter.add_tensor."""
    import gguf
    import numpy as np

    from slmkit.interop import kquants

    data = tensor.numpy().astype(np.float32)
    if kind == "f32":
        return data, None
    if kind == "f16":
        return data.astype(np.float16), None
    if kind in kquants.K_TYPES:
        return kquants.quantize(data, kind), _qtype(kind)
    if exact is not None:
        return _encode_exact(exact, kind), _qtype(kind)
    return gguf.quants.quantize(data, _qtype(kind)), _qtype(kind)


def plan_tensors(
    model: torch.nn.Module, dtype: str
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, str | None]], dict[str, torch.Tensor]]:
    """(float tensors, name -> (type, note), name -> exact codes) of the GGUF file, llama.cpp's names.

    For an slmkit-quantized model, layers whose codes are already the target block format are written as
    they are (`exact_blocks`); the others are dequantized and quantized again. Writing 4-bit layers into a
    4-bit type they do not map onto would round every weight a second time at 4 bits: refused."""
    import torch

    cfg: ModelConfig = model.config  # type: ignore[assignment]
    state = _float_state(model)
    tensors = _layout(cfg, state)
    types = tensor_types(tensors, dtype, _f32_names(cfg, tensors))
    # codes only matter for block types (kept as they are, or refused); float files need none of this
    blocks = exact_blocks(model) if dtype in BLOCK_DTYPES or dtype in K_DTYPES else {}
    if not blocks:
        return tensors, types, {}
    aux = {k: blocks[k] if k in blocks else torch.full((*v.shape, 4), float("nan")) for k, v in state.items()}
    exact = {}
    for name, codes in _layout(cfg, aux).items():
        if name not in types or codes.dim() != 3 or bool(codes.isnan().any()):
            continue
        kind = exact_kind(codes)
        if kind == dtype and codes.shape[1] % 32 == 0:
            types[name] = (dtype, None)  # already in the file's type: the output head too stays as it is
        if types[name][0] == kind:
            exact[name] = codes
        elif abs(codes[0, 0, 3].item()) == 4 and types[name][0] in ("q4_0", "q4_1", "q4_k"):
            why = "groups below 32 or outliers" if types[name][0] == "q4_1" else "its own 4-bit grid"
            raise UserError(
                f"{name} is int4 with {why}; writing it as {types[name][0]} would round its weights a second time "
                "at 4 bits. int4 maps exactly onto q4_1 only (groups that are multiples of 32, no --outliers); "
                "export q4_1 where that holds, or q5_0, q5_1, q5_k, q5_k_m, q6_k, q8_0, f16, or export the float model"
            )
    spec = getattr(model, "compression", {}) or {}
    written = len(exact)
    requantized = sum(1 for n, (k, _) in types.items() if n not in exact and k not in ("f32", "f16", "bf16"))
    log.info(
        "GGUF %s from an slmkit %s model: %d tensors keep their codes, %d re-quantized",
        dtype,
        spec.get("method"),
        written,
        requantized,
    )
    return tensors, types, exact


# ---- export ---------------------------------------------------------------------------------------
def check_exportable(config: ModelConfig) -> None:
    """UserError naming anything llama.cpp's matching architecture would compute differently."""
    layout = family_spec(config.family).gguf
    if layout is None:
        raise UserError(f"GGUF export: {config.family} models have no llama.cpp architecture in slmkit yet")
    scaling = config.rope_scaling
    if scaling is not None and scaling.type == "dynamic":
        raise UserError("GGUF export: dynamic (NTK) rope scaling has no llama.cpp equivalent")
    if scaling is not None and scaling.type == "longrope":
        raise UserError(
            "GGUF export: longrope rope scaling has no llama.cpp equivalent here (llama.cpp picks Phi-3's short or "
            "long factors by context size, transformers and slmkit per forward call, and slmkit writes no phi3 GGUF)"
        )
    if scaling is not None and scaling.type not in layout.rope_scaling:
        raise UserError(f"GGUF export: {scaling.type} rope scaling on a {config.family} model is not supported")
    if scaling is not None and scaling.type == "yarn":
        _check_yarn(scaling, layout.arch)
    if config.activation != layout.activation or (config.mlp_bias and not layout.mlp_bias):
        needs = f"a {layout.activation} MLP" + ("" if layout.mlp_bias else " without biases")
        has = config.activation + (" with biases" if config.mlp_bias else "")
        raise UserError(f"GGUF export: llama.cpp's {layout.arch} architecture needs {needs}, not {has}")
    if "moe" in config.mlps and config.moe_norm_topk != layout.expert_weights_norm:
        does = "renormalises" if layout.expert_weights_norm else "does not renormalise"
        raise UserError(
            f"GGUF export: llama.cpp's {layout.arch} architecture {does} the top-k router weights; this model has "
            f"moe_norm_topk={config.moe_norm_topk}, so llama.cpp would route its tokens with other weights"
        )
    problem = layout.refuse(config) if layout.refuse is not None else None
    if problem is not None:
        raise UserError(f"GGUF export: {problem}")


def _check_yarn(scaling: RopeScaling, arch: str) -> None:
    """UserError for the yarn options llama.cpp's attention architectures cannot reproduce: the ramp's ends unrounded
    (ggml_rope_yarn_corr_dims always floors and ceils them) and betas other than 32 and 1 (its loaders for these
    architectures do not read `rope.scaling.yarn_beta_fast/slow`: a file carrying them runs with 32 and 1)."""
    if scaling.truncate is False:
        raise UserError(
            "GGUF export: yarn rope_scaling truncate: false has no llama.cpp equivalent (llama.cpp always rounds the "
            "ramp's ends to whole dimensions, as truncate: true does)"
        )
    for name, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        value = getattr(scaling, name)
        if value is not None and value != default:
            raise UserError(
                f"GGUF export: yarn rope_scaling {name} {value:g} has no llama.cpp equivalent (its {arch} "
                "architecture always uses beta_fast 32 and beta_slow 1)"
            )


def _file_type(dtype: str) -> int:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
        # llama.cpp has no file type for "every matrix Q4_K/Q5_K": the nearest, its _S mixtures, names them
        "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S,
        "q5_k": gguf.LlamaFileType.MOSTLY_Q5_K_S,
        "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
        "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
        "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    }[dtype]


def context_length(config: ModelConfig) -> int:
    """The context llama.cpp may use: capped at the sliding window, inside which attention is exact."""
    window = config.sliding_window
    return min(config.max_seq_len, window) if window is not None else config.max_seq_len


def export_gguf(model_path: str | Path, out: str | Path, dtype: str = "f16", overwrite: bool = False) -> Path:
    """Write `out` (a .gguf file) for the model directory `model_path`; returns the path written. An existing
    `out` file is replaced only with `overwrite` (never a directory)."""
    if dtype not in GGUF_DTYPES:
        raise UserError(f"GGUF dtype {dtype!r} is not supported; choose one of: {', '.join(GGUF_DTYPES)}")
    import gguf

    from slmkit.interop.checkpoint import load_model, resolve_model_dir, use_umask
    from slmkit.interop.outputs import check_output, clean_stale_temporaries, temp_prefix

    directory = resolve_model_dir(model_path)
    out = check_output(out, "file", overwrite)
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise UserError(f"{directory}: no tokenizer.json; GGUF files carry the tokenizer, so copy it there")
    model = load_model(directory)
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    check_exportable(cfg)
    vocab = read_bpe_vocab(tokenizer_path, cfg.vocab_size)
    tensors, types, exact = plan_tensors(model, dtype)
    for name, (kind, why) in types.items():
        if why is not None:  # a fallback (odd row length) is worth a warning; llama.cpp's type rules are not
            level = logging.WARNING if why.startswith("row length") else logging.INFO
            log.log(level, "GGUF %s: %s written as %s (%s)", dtype, name, kind, why)
    arch = family_spec(cfg.family).gguf.arch

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out.parent, out.name)
    # .NAME.pPID-XXXX.tmp: the PID tells a later run whether the writer is still alive
    prefix = temp_prefix(out.name).replace(".tmp-", ".", 1)
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        use_umask(tmp)
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(directory.name)
        writer.add_file_type(_file_type(dtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(cfg.vocab_size)
        layout = family_spec(cfg.family).gguf
        if layout.hparams is not None:  # the architecture's own (a state-space model's widths)
            layout.hparams(writer, cfg)
        else:
            _attention_hparams(writer, cfg)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        if cfg.bos_token_id is not None:
            writer.add_bos_token_id(cfg.bos_token_id)
        if cfg.eos_token_id is not None:
            writer.add_eos_token_id(cfg.eos_token_id)
        writer.add_add_bos_token(_adds_bos(directory))
        for name, tensor in tensors.items():
            data, raw_dtype = _encode(tensor, types[name][0], exact.get(name))
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _attention_hparams(writer: Any, cfg: ModelConfig) -> None:
    """Hyperparameters of the attention architectures (llama, qwen2, qwen3, gpt2)."""
    import gguf

    writer.add_context_length(context_length(cfg))
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    _add_expert_metadata(writer, cfg)
    if cfg.norm == "rmsnorm":
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        writer.add_layer_norm_eps(cfg.norm_eps)
    if cfg.positions == "rope":
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.rope_dim)
        writer.add_key_length(cfg.dim_per_head)
        writer.add_value_length(cfg.dim_per_head)
        if cfg.rope_scaling is not None and cfg.rope_scaling.type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
        if cfg.rope_scaling is not None and cfg.rope_scaling.type == "yarn":
            _yarn_hparams(writer, cfg.rope_scaling)


def yarn_attn_factor(scaling: RopeScaling) -> float:
    """`rope.scaling.attn_factor` for a yarn scaling: llama.cpp multiplies cos and sin by `0.1 ln f + 1` times this
    key (llama_context's yarn_attn_factor, its cancel of the kernel's own `1 + 0.1 ln f`, then the kernel), so the
    key is our attention scale over that default: 1 for transformers' default, else an explicit `attention_factor` or
    the mscale/mscale_all_dim ratio divided by `0.1 ln f + 1`."""
    import math

    default = 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
    return scaling.attention_scale() / default


def _yarn_hparams(writer: Any, scaling: RopeScaling) -> None:
    """llama.cpp's yarn keys: type, factor (it stores 1 / factor as its freq_scale), the original window (its
    n_ctx_orig_yarn, from which ggml_rope_yarn_corr_dims floors and ceils the ramp's ends as transformers'
    `truncate: true` does) and, when not 1, the attention factor. beta_fast and beta_slow are llama.cpp's defaults
    (32, 1): its llama/qwen2 loaders do not read the beta keys, so `check_exportable` refuses other values."""
    import gguf

    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(scaling.factor)
    writer.add_rope_scaling_orig_ctx_len(scaling.original_max_seq_len)
    factor = yarn_attn_factor(scaling)
    if abs(factor - 1.0) > 1e-7:
        writer.add_rope_scaling_attn_factors(factor)


def _adds_bos(directory: Path) -> bool:
    """Whether the tokenizer prepends BOS (tokenizer_config.json's add_bos_token; ours does not)."""
    try:
        return bool(json.loads((directory / "tokenizer_config.json").read_text()).get("add_bos_token", False))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
