"""One family of model shapes shared by ladders and the planner, so a plan is shaped like the rungs.

A shape is (width, depth), width a multiple of 16; heads are about 32 wide (the most heads, at most
width // 32 and at least 2, that divide the width into even head sizes), KV heads are half the heads when
that divides evenly (grouped-query attention with groups of 2), and the MLP width is 8/3 of the model width
rounded to a multiple of 32, as in Llama and the presets. The law is fitted on non-embedding parameters
(Kaplan et al. 2020 found those give cleaner laws at small scale); FLOPs come from
``ModelConfig.flops_per_token``, which counts the embedding's matmul in the output head.

A shape also names its mixer family (``--mixer``): ``attention`` (the default and what ladders without a
family recorded were), ``mamba2`` (every layer Mamba-2 and no MLP, the Mamba-2 recipe, as in the
``*-mamba2`` presets), ``gla`` and ``based`` (every layer that linear attention, MLP kept), ``hybrid`` (the
presets' three mamba2 layers then one attention layer, repeated over the depth), ``moe`` (attention, every
MLP a mixture of 8 experts with top-2 routing, each expert half the dense MLP's width: ``micro-moe``'s recipe,
the dense member's active FLOPs per token with 4x its MLP parameters; saved as the ``mixtral`` family, so it
exports to transformers' Mixtral and GGUF), or a comma-separated pattern of mixer names (``mamba2,attention``)
repeated over the depth the same way. Width, heads and MLP width follow the rules above for every family;
parameters and FLOPs are ModelConfig's exact counts for the family's layers (a mixture of experts: N counts
every expert, C the active ones), so a family's law is fitted on its own N and C.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from slmkit.config import BUILTIN_MIXER_KINDS, PRESETS, ModelConfig
from slmkit.errors import UserError

WIDTH_STEP = 16
DEFAULT_MIXER = "attention"
# named mixer families: the repeated per-layer pattern of each
MIXER_FAMILIES: dict[str, tuple[str, ...]] = {
    "attention": ("attention",),
    "mamba2": ("mamba2",),
    "gla": ("gla",),
    "based": ("based",),
    "hybrid": ("mamba2", "mamba2", "mamba2", "attention"),
    "moe": ("attention",),
}
# families that differ from their mixer pattern's in the MLP: ModelConfig fields on top of it
FAMILY_MLP: dict[str, dict[str, Any]] = {
    "moe": dict(mlp="moe", moe_experts=8, moe_top_k=2, family="mixtral"),
}
# an expert's width against the dense MLP's (so top-2 of 8 experts costs the dense MLP's FLOPs)
MOE_EXPERT_WIDTH = 0.5


def parse_mixer(text: str | None) -> str:
    """The canonical family name of `--mixer`: a named family, or a comma-separated pattern of mixer names
    (returned comma-joined without spaces; a one-kind pattern is that kind's family)."""
    if text is None or not str(text).strip():
        return DEFAULT_MIXER
    text = str(text).strip()
    if text in MIXER_FAMILIES:
        return text
    kinds = tuple(k.strip() for k in text.split(","))
    bad = [k for k in kinds if k not in BUILTIN_MIXER_KINDS]
    if bad or not kinds:
        raise UserError(
            f"--mixer: {text!r} is neither a mixer family ({', '.join(MIXER_FAMILIES)}) nor a comma-separated "
            f"pattern of mixer names ({', '.join(BUILTIN_MIXER_KINDS)}), e.g. mamba2,mamba2,mamba2,attention"
        )
    if len(set(kinds)) == 1:
        return kinds[0]
    return ",".join(kinds)


def mixer_pattern(mixer: str) -> tuple[str, ...]:
    """The per-layer pattern (repeated over the depth) of a canonical family name from :func:`parse_mixer`."""
    return MIXER_FAMILIES.get(mixer) or tuple(mixer.split(","))


def mixer_overrides(mixer: str, depth: int) -> dict[str, Any]:
    """ModelConfig fields that give `depth` layers the family's mixers (empty for attention, so an
    attention ladder's configs are exactly what they were before families existed)."""
    mixer = parse_mixer(mixer)
    if mixer in FAMILY_MLP:
        return dict(FAMILY_MLP[mixer])
    pattern = mixer_pattern(mixer)
    if pattern == ("attention",):
        return {}
    # saved in slmkit's own format, which holds any mixers (the ladder's base preset is a llama)
    if len(set(pattern)) == 1:
        kind = pattern[0]
        extra = dict(mlp="none") if kind == "mamba2" else {}
        return dict(mixer=kind, family="slmkit", **extra)
    return dict(layer_pattern=[pattern[i % len(pattern)] for i in range(depth)], family="slmkit")


def shape_overrides(width: int, depth: int, context: int, mixer: str = DEFAULT_MIXER) -> dict[str, Any]:
    """ModelConfig fields of the family member (width, depth) at this context length."""
    if width < WIDTH_STEP or width % WIDTH_STEP != 0:
        raise UserError(f"model width must be a positive multiple of {WIDTH_STEP}, got {width}")
    if depth < 1:
        raise UserError(f"model depth must be >= 1, got {depth}")
    n_heads = max(2, width // 32)
    while n_heads > 1 and (width % n_heads or (width // n_heads) % 2):
        n_heads -= 1
    n_kv_heads = n_heads // 2 if n_heads % 2 == 0 else n_heads
    d_ff = max(32, round(width * 8 / 3 / 32) * 32)
    if FAMILY_MLP.get(parse_mixer(mixer), {}).get("mlp") == "moe":
        d_ff = max(WIDTH_STEP, round(d_ff * MOE_EXPERT_WIDTH / WIDTH_STEP) * WIDTH_STEP)
    fields = dict(d_model=width, n_layers=depth, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff, max_seq_len=context)
    return {**fields, **mixer_overrides(mixer, depth)}


@dataclass(frozen=True)
class Shape:
    width: int
    depth: int
    mixer: str = DEFAULT_MIXER  # canonical family name (parse_mixer)

    @property
    def name(self) -> str:
        return f"{self.width}x{self.depth}"

    def config(self, vocab_size: int, context: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, **shape_overrides(self.width, self.depth, context, self.mixer))


def with_mixer(shapes: list[Shape], mixer: str) -> list[Shape]:
    """The same widths and depths in another mixer family, ordered by that family's parameters."""
    mixer = parse_mixer(mixer)
    out = {Shape(s.width, s.depth, mixer) for s in shapes}
    return sorted(out, key=lambda s: (s.config(8192, 128).num_params(False), s.width))


def parse_sizes(text: str) -> list[Shape]:
    """`WIDTHxDEPTH` items or preset names, comma separated (e.g. ``64x2,96x3,micro``)."""
    shapes = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)x(\d+)", item)
        if match:
            shape = Shape(int(match.group(1)), int(match.group(2)))
        elif item in PRESETS:
            shape = Shape(PRESETS[item]["d_model"], PRESETS[item]["n_layers"])
        else:
            raise UserError(f"--sizes: {item!r} is neither WIDTHxDEPTH (e.g. 64x2) nor a preset ({', '.join(PRESETS)})")
        shape_overrides(shape.width, shape.depth, 8)  # validates
        shapes.append(shape)
    if len(set(shapes)) < 2:
        raise UserError("--sizes: give at least two different model sizes, e.g. --sizes 32x2,64x2,96x3")
    return sorted(set(shapes), key=lambda s: s.config(8192, 128).num_params(False))


# Default ladder sizes: non-embedding parameters roughly doubling from ~25k to ~5M.
DEFAULT_SIZES = [
    Shape(32, 2),
    Shape(32, 4),
    Shape(64, 2),
    Shape(64, 4),
    Shape(96, 4),
    Shape(128, 4),
    Shape(128, 8),
    Shape(192, 6),
    Shape(256, 6),
    Shape(256, 8),
    Shape(384, 8),
]


def family(
    vocab_size: int,
    context: int,
    max_width: int = 4096,
    aspect: tuple[float, float] = (12.0, 64.0),
    mixer: str = DEFAULT_MIXER,
):
    """All (width, depth) shapes whose width/depth ratio lies in `aspect` (presets sit at 32)."""
    out = []
    for width in range(WIDTH_STEP, max_width + 1, WIDTH_STEP):
        for depth in range(1, 129):
            ratio = width / depth
            if aspect[0] <= ratio <= aspect[1] or (width == WIDTH_STEP and depth <= 2):
                out.append(Shape(width, depth, mixer))
    return out
