"""A model directory (or a run's latest checkpoint) loaded with its tokenizer: what inference and evaluation take.

It sits below infer/ and eval/ so they can load models without reaching up to `slmkit.api`, which re-exports
`load` and `LoadedModel` as the public names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmkit.errors import UserError

if TYPE_CHECKING:  # torch is imported on first use, so `import slmkit` stays fast
    import torch


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any  # tokenizers.Tokenizer
    directory: Path

    @property
    def config(self):
        return self.model.config


def load(path: str | Path | LoadedModel, device: str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """A model dir or run dir (latest checkpoint) with its tokenizer, ready for inference."""
    if isinstance(path, LoadedModel):
        return path
    from slmkit.data.tokenizer import load_tokenizer
    from slmkit.interop.checkpoint import load_model, resolve_model_dir

    directory = resolve_model_dir(path)
    if not (directory / "tokenizer.json").is_file():
        raise UserError(f"{directory}: no tokenizer.json in the model directory; copy the tokenizer there")
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    model = load_model(directory, device=device, dtype=dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, directory=directory)
