"""One family of model shapes shared by ladders and the planner, so a plan is shaped like the rungs.

A shape is (width, depth), width a multiple of 16; heads are about 32 wide (the most heads, at most
width // 32 and at least 2, that divide the width into even head sizes), KV heads are half the heads when
that divides evenly (grouped-query attention with groups of 2), and the MLP width is 8/3 of the model width
rounded to a multiple of 32, as in Llama and the presets. The law is fitted on non-embedding parameters
(Kaplan et al. 2020 found those give cleaner laws at small scale); FLOPs come from
``ModelConfig.flops_per_token``, which counts the embedding's matmul in the output head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from slmkit.config import PRESETS, ModelConfig
from slmkit.errors import UserError

WIDTH_STEP = 16


def shape_overrides(width: int, depth: int, context: int) -> dict[str, Any]:
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
    return dict(d_model=width, n_layers=depth, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff, max_seq_len=context)


@dataclass(frozen=True)
class Shape:
    width: int
    depth: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.depth}"

    def config(self, vocab_size: int, context: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, **shape_overrides(self.width, self.depth, context))


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


def family(vocab_size: int, context: int, max_width: int = 4096, aspect: tuple[float, float] = (12.0, 64.0)):
    """All (width, depth) shapes whose width/depth ratio lies in `aspect` (presets sit at 32)."""
    out = []
    for width in range(WIDTH_STEP, max_width + 1, WIDTH_STEP):
        for depth in range(1, 129):
            ratio = width / depth
            if aspect[0] <= ratio <= aspect[1] or (width == WIDTH_STEP and depth <= 2):
                out.append(Shape(width, depth))
    return out
