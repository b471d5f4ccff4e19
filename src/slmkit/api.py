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
from typing import TYPE_CHECKING, Any

from slmkit import defaults
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
) -> str | list[str]:
    """The continuation of `prompt` (greedy by default, as `slm generate`: `slmkit.defaults`); a list of prompts
    gives a list, generated as a batch.

    json_schema / regex / grammar (EBNF) constrain the output (at most one); draft (a smaller model with the
    same tokenizer) or lookup=True turn on lossless speculative decoding. For log-probabilities, streaming
    and statistics use :class:`slmkit.infer.engine.Engine`.
    """
    from slmkit.infer.constrained import Constraint
    from slmkit.infer.engine import Engine, load_draft
    from slmkit.infer.sampling import SamplingParams

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
    lm = load(model)
    draft_model = load_draft(lm, draft) if draft is not None else None
    engine = Engine(lm.model, lm.tokenizer, draft=draft_model)
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
    import numpy as np

    from slmkit.data.tokenizer import eot_token_id, file_sha256
    from slmkit.eval.perplexity import score, token_nats

    lm = load(model)
    seq_len = seq_len or lm.config.max_seq_len
    if seq_len < 1 or seq_len > lm.config.max_seq_len:
        raise UserError(f"--seq-len must be in [1, {lm.config.max_seq_len}] (the model's context), got {seq_len}")
    paths = [Path(p) for p in ([data] if isinstance(data, (str, Path)) else data)]
    if not paths:
        raise UserError("nothing to evaluate on: give a data dir or text files with --data")
    if len(paths) == 1 and paths[0].is_dir() and (paths[0] / "meta.json").exists():
        from slmkit.data.shards import load_data_dir

        data_dir = load_data_dir(paths[0])
        if split not in ("train", "val"):
            raise UserError(f"--split must be train or val, got {split!r}")
        model_tok = lm.directory / "tokenizer.json"
        if file_sha256(model_tok) != data_dir.meta.get("tokenizer_sha256"):
            raise UserError(
                f"{paths[0]} was tokenized with a different tokenizer than {lm.directory}; "
                "evaluate on text files instead, or prepare the data with --tokenizer "
                f"{model_tok}"
            )
        tokens = data_dir.train if split == "train" else data_dir.val
        n_bytes = data_dir.meta["splits"][split]["bytes"]
    else:
        from slmkit.data.sources import iter_documents

        eot = eot_token_id(lm.tokenizer)
        ids: list[int] = [eot]
        n_bytes = 0
        for text in iter_documents([str(p) for p in paths]):
            ids.extend(lm.tokenizer.encode(text).ids)
            ids.append(eot)
            n_bytes += len(text.encode("utf-8"))
        tokens = np.asarray(ids, dtype=np.int64)
    if len(tokens) < 2:
        raise UserError("evaluation text is too short: need at least two tokens")
    nats, count = token_nats(lm.model, tokens, seq_len, batch_size)
    return score(nats, count, n_bytes)


def prepare(*args: Any, **kwargs: Any) -> dict:
    """Tokenize sources into a data dir (see `slmkit.data.prepare.prepare`)."""
    from slmkit.data.prepare import prepare as _prepare

    return _prepare(*args, **kwargs)


def train(*args: Any, **kwargs: Any):
    """Train within a budget (see `slmkit.train.loop.train`)."""
    from slmkit.train.loop import train as _train

    return _train(*args, **kwargs)


def compress(*args: Any, **kwargs: Any):
    """Quantize, prune or factorize a model dir (see `slmkit.compress.pipeline.compress`)."""
    from slmkit.compress.pipeline import compress as _compress

    return _compress(*args, **kwargs)


def distill(*args: Any, **kwargs: Any):
    """Distil a teacher into a student (see `slmkit.compress.distill.distill`)."""
    from slmkit.compress.distill import distill as _distill

    return _distill(*args, **kwargs)
