"""The public Python API; the CLI and (later) the server call these same functions.

import slmkit
lm = slmkit.load("runs/quickstart")
print(slmkit.generate(lm, "def fib(n):", max_new_tokens=64, temperature=0))
print(slmkit.evaluate(lm, ["data/val.txt"]).bits_per_byte)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmkit import defaults
from slmkit.errors import UserError
from slmkit.loading import LoadedModel, load

__all__ = [
    "LoadedModel",
    "load",
    "generate",
    "evaluate",
    "prepare",
    "train",
    "compress",
    "distill",
    "merge_adapter",
    "MergedAdapter",
    "merge",
    "build",
]


def generate(
    model: str | Path | LoadedModel,
    prompt: str | Sequence[str],
    max_new_tokens: int = defaults.MAX_NEW_TOKENS,
    temperature: float = defaults.TEMPERATURE,
    top_k: int | None = defaults.TOP_K,
    top_p: float | None = defaults.TOP_P,
    seed: int | None = None,
    stop: list[str] | None = None,
    *,
    min_p: float | None = defaults.MIN_P,
    repetition_penalty: float = defaults.REPETITION_PENALTY,
    frequency_penalty: float = defaults.FREQUENCY_PENALTY,
    presence_penalty: float = defaults.PRESENCE_PENALTY,
    json_schema: str | dict | None = None,
    regex: str | None = None,
    grammar: str | None = None,
    draft: str | Path | LoadedModel | None = None,
    lookup: bool = False,
    speculate_k: int | None = None,
    truncate: bool = False,
    kv_window: int | None = None,
    kv_sinks: int = 0,
    kv_dtype: str = "auto",
    kv_prune_keys: float = 0.0,
    kv_memory: int | None = None,
    kv_block: int | None = None,
) -> str | list[str]:
    """The continuation of `prompt` (greedy by default, as `slm generate`: `slmkit.defaults`); a list of prompts
    gives a list, generated as a batch.

    json_schema / regex / grammar (EBNF) constrain the output (at most one); draft (a smaller model with the
    same tokenizer) or lookup=True turn on lossless speculative decoding. For log-probabilities, streaming
    and statistics use :class:`slmkit.infer.engine.Engine`.

    kv_window (+ kv_sinks): a KV cache of the first kv_sinks and last kv_window positions, so generation may run
    past the context at constant memory; kv_dtype int8/int4: quantized keys and values; kv_prune_keys: the
    fraction of key channels pruned per head; kv_memory (with kv_window): InfLLM-style block memory, each query
    also attends the kv_memory best of the evicted blocks of kv_block positions (see docs/long-context.md).
    """
    from slmkit.infer.constrained import Constraint
    from slmkit.infer.engine import Engine, load_draft
    from slmkit.infer.sampling import SamplingParams
    from slmkit.models.state import KVCacheSpec

    sampling = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        seed=seed,
    )
    constraints = [
        c
        for c in (
            Constraint.json_schema(json_schema) if json_schema is not None else None,
            Constraint.regex(regex) if regex is not None else None,
            Constraint.grammar(grammar) if grammar is not None else None,
        )
        if c is not None
    ]
    if len(constraints) > 1:
        raise UserError("give at most one of json_schema, regex and grammar")
    if draft is not None and lookup:
        raise UserError("choose one kind of speculation: a draft model or lookup, not both")
    kv_cache = KVCacheSpec(
        window=kv_window, sinks=kv_sinks, dtype=kv_dtype, prune_keys=kv_prune_keys,  # type: ignore[arg-type]
        topk=kv_memory, block_size=kv_block,
    )  # fmt: skip
    lm = load(model)
    draft_model = load_draft(lm, draft) if draft is not None else None
    engine = Engine(lm.model, lm.tokenizer, draft=draft_model, kv_cache=kv_cache)
    completions = engine.generate(
        prompt,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop=stop or (),
        truncate=truncate,
        constraint=constraints[0] if constraints else None,
        speculate="draft" if draft is not None else "lookup" if lookup else "off",
        speculate_k=speculate_k,
    )
    texts = [c.text for c in completions]
    return texts[0] if isinstance(prompt, str) else texts


def evaluate(
    model: str | Path | LoadedModel,
    data: Sequence[str | Path] | str | Path,
    split: str = "val",
    seq_len: int | None = None,
    batch_size: int = 8,
):
    """Loss, perplexity and bits per byte on a data dir's split or on text files (one document each)."""
    from slmkit.eval.perplexity import evaluate_text

    return evaluate_text(load(model), data, split=split, seq_len=seq_len, batch_size=batch_size)


def prepare(*args: Any, overwrite: bool = False, **kwargs: Any) -> dict:
    """Tokenize sources into a data dir (see `slmkit.data.prepare.prepare`); a non-empty `out` is refused
    unless `overwrite=True`."""
    import inspect

    from slmkit.data.prepare import prepare as _prepare
    from slmkit.interop.outputs import check_output

    try:
        out = inspect.signature(_prepare).bind(*args, **kwargs).arguments["out"]
    except TypeError as exc:
        raise TypeError(f"prepare(): {exc}") from None
    check_output(out, "dir", overwrite=overwrite, option="out")  # existing, a file, unwritable: before any work
    return _prepare(*args, **kwargs)


def train(*args: Any, **kwargs: Any):
    """Train within a budget (see `slmkit.train.loop.train`); `overwrite=True` replaces an earlier run in the
    run dir, which is otherwise refused."""
    from slmkit.train.loop import train as _train

    return _train(*args, **kwargs)


def finetune(*args: Any, **kwargs: Any):
    """Fine-tune a model dir on chat or prompt/completion JSONL, fully or with adapters (see
    `slmkit.train.finetune.finetune`); an earlier run in the run dir is replaced only with `overwrite=True`."""
    from slmkit.train.finetune import finetune as _finetune

    return _finetune(*args, **kwargs)


def compress(*args: Any, **kwargs: Any):
    """Quantize, prune, factorize or carve into experts a model dir (see `slmkit.compress.pipeline.compress`); an
    existing output directory is replaced only with `overwrite=True`."""
    from slmkit.compress.pipeline import compress as _compress

    return _compress(*args, **kwargs)


def distill(*args: Any, **kwargs: Any):
    """Distil a teacher into a student (see `slmkit.compress.distill.distill`)."""
    from slmkit.compress.distill import distill as _distill

    return _distill(*args, **kwargs)


@dataclass(frozen=True)
class MergedAdapter:
    """What `merge_adapter` wrote."""

    out: Path
    layers: int  # layers whose weights took the update
    dequantized: bool  # the base was slmkit-compressed: the output is its float (dequantized) form plus the update


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, overwrite: bool = False) -> MergedAdapter:
    """`slm merge-adapter`: fold the PEFT LoRA adapter in `adapter` into the model `base` (a model dir or run dir)
    and write a plain model directory to `out` (W + scale * B @ A in every adapted layer; transformers loads it).

    A compressed base (QLoRA: int8/int4 from `slm compress`) is dequantized first, so the output is a float model
    whose logits are those of the compressed base with the adapter; `slm compress` it again to shrink it. An
    existing `out` is replaced only with `overwrite`."""
    from slmkit.interop.adapters import check_adapter_dir, dequantize_model, load_adapter
    from slmkit.interop.checkpoint import load_model, resolve_model_dir, save_model
    from slmkit.interop.outputs import check_output
    from slmkit.models.lora import merge_adapters

    directory = resolve_model_dir(base)
    out = Path(out)
    if out.resolve() in (directory.resolve(), Path(adapter).resolve()):
        raise UserError(f"--out {out} is an input directory; choose another directory")
    check_output(out, "dir", overwrite)
    check_adapter_dir(adapter)  # before the base is loaded
    model = load_model(directory)
    load_adapter(model, adapter)
    compressed = model.config.extra.get("quantization_config") is not None
    if compressed:
        model = dequantize_model(model)
    layers = merge_adapters(model)
    save_model(model, out, tokenizer_dir=directory)
    return MergedAdapter(out, len(layers), compressed)


def merge(config_path: str | Path, out: str | Path, seed: int = 0, overwrite: bool = False):
    """Merge the model dirs a mergekit-shaped YAML config names (linear, task_arithmetic, ties, dare_linear,
    dare_ties, model_stock, slerp) into the model dir `out` (see `slmkit.merge.run.merge`); `seed` fixes DARE's
    draws. An existing non-empty `out` is replaced only with `overwrite=True`."""
    from slmkit.merge.run import merge as _merge

    return _merge(config_path, out, seed=seed, overwrite=overwrite)


def build(
    data: str | Path | Sequence[str | Path],
    budget: str | float,
    out: str | Path,
    max_latency: str | float | None = None,
    max_size: str | int | None = None,
    tasks: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> dict:
    """`slm build`: plan, train, compress, verify and ship the best model for `budget` ("30m", or seconds) under
    `max_latency` ("5ms", or ms per token) and `max_size` ("20MB", or bytes) into `out` (see
    `slmkit.build.pipeline.build`; `options` are `BuildRequest` fields: device, mixer, seed, fit, threads, ...).
    Returns build.json's contents."""
    from slmkit.build.options import BuildRequest, parse_duration, parse_latency, parse_size
    from slmkit.build.pipeline import build as _build

    sources = [str(data)] if isinstance(data, str | Path) else [str(d) for d in data]
    request = BuildRequest(
        data=sources,
        budget_seconds=parse_duration(budget) if isinstance(budget, str) else float(budget),
        max_latency_ms=parse_latency(max_latency) if isinstance(max_latency, str) else max_latency,
        max_size_bytes=parse_size(max_size) if isinstance(max_size, str) else max_size,
        tasks=list(tasks),
        **options,
    )
    return _build(request, out, resume=resume, overwrite=overwrite)
