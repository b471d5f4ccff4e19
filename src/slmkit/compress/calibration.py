"""Calibration data and activation capture, shared by the quantizers and pruners.

Calibration windows come from a data dir's train split (never val, which scores the result). Layers are
visited in order: to see block i's inputs we run the model from the embedding and stop right after block
i, so the earlier blocks are already in their compressed form (as GPTQ, AWQ and Wanda do) and the code
does not depend on the block's call signature.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slmkit.errors import UserError


class _Stop(Exception):
    pass


def calibration_batches(
    data_dir: str | Path | None,
    model_dir: Path,
    samples: int,
    seq_len: int,
    batch_size: int = 16,
    seed: int = 0,
) -> list[torch.Tensor]:
    """`samples` random windows of `seq_len` tokens from the train split, as (B, T) batches."""
    from slmkit.data.shards import load_data_dir
    from slmkit.data.tokenizer import file_sha256

    if data_dir is None:
        raise UserError("this method needs calibration data: pass --data DATA_DIR (from `slm data prepare`)")
    if samples < 1 or seq_len < 2:
        raise UserError(f"--calib-samples must be >= 1 and --calib-seq-len >= 2, got {samples} and {seq_len}")
    data = load_data_dir(data_dir)
    model_tok = model_dir / "tokenizer.json"
    if model_tok.is_file() and file_sha256(model_tok) != data.meta.get("tokenizer_sha256"):
        raise UserError(
            f"{data_dir} was tokenized with a different tokenizer than {model_dir}; prepare calibration data "
            f"with --tokenizer {model_tok}"
        )
    tokens = data.train
    windows = (len(tokens) - 1) // seq_len
    if windows < samples:
        raise UserError(
            f"{data_dir}: calibration needs {samples} windows of {seq_len} tokens but the train split has "
            f"{len(tokens)} tokens ({windows} windows); use more data, or lower --calib-samples / --calib-seq-len"
        )
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(windows, size=samples, replace=False)) * seq_len
    rows = np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts])
    block = torch.from_numpy(rows)
    return [block[i : i + batch_size] for i in range(0, samples, batch_size)]


@torch.no_grad()
def run_until_block(
    model: nn.Module,
    layer_idx: int,
    batches: list[torch.Tensor],
    hooks: dict[str, Callable[[torch.Tensor], None]],
    block_hook: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> None:
    """Run each batch through the model, calling hooks[name](input 2-D) on the named submodules of
    block `layer_idx` (and block_hook(block_input, block_output)), stopping after that block."""
    block = model.layers[layer_idx]
    handles = []
    for name, fn in hooks.items():
        module = block.get_submodule(name)
        handles.append(
            module.register_forward_pre_hook(lambda _m, args, fn=fn: fn(args[0].reshape(-1, args[0].shape[-1])))
        )

    def stop(_m, args, output):
        if block_hook is not None:
            block_hook(args[0], output)
        raise _Stop

    handles.append(block.register_forward_hook(stop))
    try:
        for batch in batches:
            try:
                model(batch)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def final_hidden_inputs(model: nn.Module, batches: list[torch.Tensor], fn: Callable[[torch.Tensor], None]) -> None:
    """Call fn on the inputs of lm_head (2-D)."""
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: fn(args[0].reshape(-1, args[0].shape[-1])))
    try:
        for batch in batches:
            model(batch)
    finally:
        handle.remove()
