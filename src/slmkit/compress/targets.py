"""Which layers of a model the compression methods work on."""

from __future__ import annotations

from typing import Any

from slmkit.interop.families import family_spec


def linear_names(config: Any) -> list[str]:
    """Names of the linear layers inside the transformer blocks that methods compress (the family's spec
    says which: GPT-2's ungated MLP has no gate_proj)."""
    return family_spec(config.family).block_linears(config)
