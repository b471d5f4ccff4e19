"""The data stage: read corpora, train or load a tokenizer, write token shards.

Kept light on purpose: importing ``slmkit.data`` imports neither torch nor the tokenizer libraries;
import the submodules (``slmkit.data.prepare``, ``slmkit.data.shards`` ...) where they are needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmkit.data.prepare import prepare
    from slmkit.data.shards import DataDir, load_data_dir
    from slmkit.data.sources import SourceStats, iter_documents
    from slmkit.data.tokenizer import EOT_TOKEN, load_tokenizer, train_tokenizer

__all__ = [
    "EOT_TOKEN",
    "DataDir",
    "SourceStats",
    "iter_documents",
    "load_data_dir",
    "load_tokenizer",
    "prepare",
    "train_tokenizer",
]

_LAZY = {
    "prepare": "slmkit.data.prepare",
    "DataDir": "slmkit.data.shards",
    "load_data_dir": "slmkit.data.shards",
    "SourceStats": "slmkit.data.sources",
    "iter_documents": "slmkit.data.sources",
    "EOT_TOKEN": "slmkit.data.tokenizer",
    "load_tokenizer": "slmkit.data.tokenizer",
    "train_tokenizer": "slmkit.data.tokenizer",
}


def __getattr__(name: str) -> Any:
    # Lazy re-exports keep `import slmkit.data` (and so `slm --help`) fast.
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
