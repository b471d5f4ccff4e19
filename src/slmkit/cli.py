"""The `slm` command. Thin: parse options, call one public function, print the result.

Heavy imports (torch, transformers, tokenizers) happen inside commands so `slm --help` stays fast.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from slmkit import defaults
from slmkit.errors import UserError

app = typer.Typer(
    name="slm",
    help="slmkit: build small language models end to end (data, tokenizer, training, evaluation, generation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare corpora: train a tokenizer and write token shards.", no_args_is_help=True)
app.add_typer(data_app, name="data")


# the KV-cache options `slm generate` and `slm serve` share (see docs/long-context.md)
KVWindow = Annotated[
    int | None,
    typer.Option(help="Keep the last N positions in the KV cache (+ --kv-sinks): constant memory, any length."),
]
KVSinks = Annotated[
    int, typer.Option(help="With --kv-window: also keep the first S positions (attention sinks, StreamingLLM).")
]
KVDtype = Annotated[str, typer.Option(help="auto (the model's dtype), int8 or int4: quantized keys and values.")]
KVPruneKeys = Annotated[
    float, typer.Option(help="Prune this fraction of each head's key channels (ThinK), chosen at prefill.")
]
KVMemory = Annotated[
    int | None,
    typer.Option(help="With --kv-window: keep evicted positions in blocks; each query attends its top K (InfLLM)."),
]
KVBlock = Annotated[int | None, typer.Option(help="With --kv-memory: positions per memory block (default 16).")]
KVMemoryBlocks = Annotated[
    int | None, typer.Option(help="With --kv-memory: keep at most M blocks, the oldest go first (default: all).")
]


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


@data_app.command("prepare")
def data_prepare(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Files (.txt .md .jsonl .parquet .py), directories, or "
            "builtin:pystdlib (the Python standard library's code)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output data directory.")],
    vocab_size: Annotated[int | None, typer.Option(help="Train a byte-level BPE tokenizer of this size.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Use this tokenizer.json instead of training one.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of documents (by content hash) for validation.")] = 0.01,
    text_field: Annotated[str, typer.Option(help="Field of .jsonl records / column of .parquet files.")] = "text",
    chunk_chars: Annotated[
        int,
        typer.Option(
            help="Cut documents longer than this many characters into pieces (at blank lines or line breaks), "
            "each its own document for the train/val split; 0 never cuts."
        ),
    ] = 16384,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace what is already in --out (an earlier data dir or other files).")
    ] = False,
) -> None:
    """Tokenize SOURCES into DATA_DIR: tokenizer.json, train.bin, val.bin and meta.json."""
    from slmkit.data.prepare import prepare
    from slmkit.interop.outputs import check_output

    check_output(out, "dir", overwrite=overwrite)  # existing, a file, under a file, unwritable: before any work
    if vocab_size is None and tokenizer is None:
        vocab_size = 8192
    meta = prepare(
        sources,
        out,
        vocab_size=vocab_size,
        tokenizer=tokenizer,
        val_fraction=val_fraction,
        text_field=text_field,
        progress=True,
        chunk_chars=chunk_chars,
    )
    _print_data_summary(out, meta)


def _print_data_summary(out: Path, meta: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{out}  (vocab {meta['vocab_size']}, {meta['dtype']})")
    for col in ("split", "documents", "tokens", "bytes", "bytes/token"):
        table.add_column(col, justify="right")
    for split in ("train", "val"):
        s = meta["splits"][split]
        table.add_row(
            split,
            f"{s['documents']:,}",
            f"{s['tokens']:,}",
            f"{s['bytes']:,}",
            f"{s['bytes'] / max(s['tokens'], 1):.2f}",
        )
    _console().print(table)
    if len(meta.get("domains", ())) > 1:
        domains = Table(title="domains (train --mix NAME=SHARE,...)")
        for col in ("domain", "source", "train tokens", "val tokens", "share"):
            domains.add_column(col, justify="left" if col in ("domain", "source") else "right")
        total = max(sum(d["tokens"] for d in meta["domains"]), 1)
        for d in meta["domains"]:
            domains.add_row(
                d["name"],
                d["source"],
                f"{d['splits']['train']['tokens']:,}",
                f"{d['splits']['val']['tokens']:,}",
                f"{d['tokens'] / total:.1%}",
            )
        _console().print(domains)
    if meta.get("skipped_files"):
        _console(stderr=True).print(f"[yellow]skipped {meta['skipped_files']} unreadable or non-UTF-8 file(s)[/]")


@data_app.command("mix-search")
def data_mix_search(
    data: Annotated[Path, typer.Argument(help="Data dir with domains (one source each), from `slm data prepare`.")],
    target: Annotated[str, typer.Option(help="The domain whose val loss the mixture should minimise.")],
    proxies: Annotated[int, typer.Option(help="Proxy runs, each on a random (Dirichlet) mixture.")] = 32,
    budget_minutes: Annotated[
        float | None, typer.Option(help="Wall-clock minutes of proxy training, all proxies together.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps of each proxy (instead of a budget).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Search dir (plan, proxies, result.json, plot); default runs/mix-search-TARGET.")
    ] = None,
    write_config: Annotated[
        Path | None, typer.Option(help="Write the chosen mixture as a training config (YAML, for --config).")
    ] = None,
    domains: Annotated[
        str | None,
        typer.Option(help="Domains to mix, comma separated (default all; leave --target out to hold it out)."),
    ] = None,
    law: Annotated[str, typer.Option(help="Mixing law: auto (lower leave-one-out error), exp or quadratic.")] = "auto",
    size: Annotated[str, typer.Option(help="Proxy model shape WIDTHxDEPTH.")] = "64x2",
    seq_len: Annotated[int, typer.Option(help="Tokens per proxy training sequence.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Sequences per proxy step.")] = 16,
    val_windows: Annotated[int, typer.Option(help="Val windows per domain every proxy is evaluated on.")] = 64,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap refits for the uncertainty of the choice.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the mixtures and the proxies.")] = 1337,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for training.")] = None,
) -> None:
    """RegMix: train tiny proxies on random mixtures of DATA's domains, fit a mixing law to the target's val loss,
    and report the best mixture (re-run the same command to resume)."""
    from slmkit.scaling.mixsearch import MixSearchSettings, run_mix_search
    from slmkit.scaling.mixsearch import write_config as write_mix_config

    settings = MixSearchSettings(
        size=size,
        seq_len=seq_len,
        batch_size=batch_size,
        val_windows=val_windows,
        seed=seed,
        device=device,
        threads=threads,
    )
    err = _console(stderr=True)

    def progress(done: int, total: int, record: dict[str, Any]) -> None:
        shares = ", ".join(f"{k}={v:.2f}" for k, v in record["realised"].items() if v)
        err.print(f"proxy {done}/{total}: {target} val loss {record['val_loss'][target]:.4f} ({shares})")

    names = [d.strip() for d in domains.split(",") if d.strip()] if domains else None
    result = run_mix_search(
        data,
        out or Path("runs") / f"mix-search-{target}",
        target,
        proxies=proxies,
        budget_minutes=budget_minutes,
        steps=steps,
        domains=names,
        law=law,
        bootstrap=bootstrap,
        settings=settings,
        progress=progress,
    )
    if result.interrupted or result.result is None:
        err.print("interrupted; re-run the same command to resume the search")
        raise typer.Exit(130)
    summary = result.result
    best = summary["best"]
    mix_text = ",".join(f"{k}={v:g}" for k, v in best["mix"].items())
    lo, hi = best["predicted_val_loss_90"]
    interval = f", 90% bootstrap {lo:.4f}..{hi:.4f}" if lo is not None else ""
    print(
        f"best mixture for {target}: --mix {mix_text}  (predicted val loss {best['predicted_val_loss']:.4f}"
        f"{interval}; {summary['fit']['law']} law, LOO RMSE {summary['fit']['loo_rmse']:.4f})"
    )
    for name in ("natural", "uniform"):
        print(f"  {name}: predicted val loss {summary[name]['predicted_val_loss']:.4f}")
    if best["bootstrap_refits"]:
        spread = ", ".join(f"{k} ±{v:.3f}" for k, v in best["share_std"].items())
        print(f"  share spread over {best['bootstrap_refits']} bootstrap refits: {spread}")
    print(f"wrote {result.out / 'result.json'} and {result.out / 'mixsearch.png'}")
    if write_config is not None:
        print(f"wrote {write_mix_config(summary, write_config)} (slm train --config it)")


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE (a ModelConfig field), got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _context_of(model: Path, at_most: int) -> int:
    """The context length of a model dir (from its config.json), capped at `at_most`: a default --seq-len."""
    from slmkit.interop.checkpoint import resolve_model_dir
    from slmkit.train.config import read_json_object

    config = read_json_object(resolve_model_dir(model) / "config.json")
    context = config.get("max_position_embeddings", config.get("n_positions"))
    return (
        min(context, at_most) if isinstance(context, int) and not isinstance(context, bool) and context > 0 else at_most
    )


def _parse_replay(value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    directory, sep, fraction = value.rpartition(":")
    try:
        share = float(fraction)
    except ValueError:
        share = -1.0
    if not sep or not directory or not 0 < share < 1:
        raise UserError(
            f"--replay expects DATA_DIR:FRACTION with a fraction in (0, 1), e.g. data/old:0.1; got {value!r}"
        )
    return {"replay": directory, "replay_fraction": share}


def parse_mix(value: str | None) -> dict[str, Any]:
    """`--mix code=0.7,papers=0.3` as the `mix` training option (shares checked by TrainConfig)."""
    if value is None:
        return {}
    mix: dict[str, float] = {}
    for item in value.split(","):
        name, sep, share = item.partition("=")
        name = name.strip()
        try:
            number = float(share)
        except ValueError:
            number = math.nan
        if not sep or not name or not math.isfinite(number) or name in mix:
            raise UserError(
                f"--mix expects DOMAIN=SHARE,... with each domain once and numeric shares, e.g. code=0.7,papers=0.3; "
                f"got {value!r}"
            )
        mix[name] = number
    return {"mix": mix}


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="Data dir written by `slm data prepare`.")],
    out: Annotated[Path, typer.Option("--out", help="Run dir: checkpoints/, metrics.jsonl, final/.")],
    preset: Annotated[
        str | None, typer.Option(help="Model preset: tiny, micro, mini, small, medium, base, 124m.")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of training options (and `model:` overrides).")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Model field override, e.g. --set n_layers=6.")] = [],  # noqa: B006
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine, wsd (warmup-stable-decay) or constant.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Budget: optimizer steps.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Budget: training tokens.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Budget: wall-clock minutes of training.")] = None,
    max_flops: Annotated[float | None, typer.Option(help="Budget: training FLOPs (6N-style count).")] = None,
    eval_interval: Annotated[int | None, typer.Option(help="Evaluate on val every N steps.")] = None,
    save_interval: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (init and data order).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="auto (bf16 autocast on capable GPUs and, for models 128+ wide, on CPUs with native bf16), float32, "
            "bfloat16."
        ),
    ] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="auto, single, ddp or fsdp. Under torchrun (`torchrun --nproc-per-node N -m slmkit train ...`) "
            "auto means ddp; alone it means single. --batch-size is per process."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier run (or other files) in --out instead of refusing.")
    ] = False,
    init: Annotated[
        Path | None,
        typer.Option(
            help="Start from this model directory's config and weights (continued training; an upcycled model) "
            "instead of a fresh --preset."
        ),
    ] = None,
    replay: Annotated[
        str | None,
        typer.Option(
            help="DATA_DIR:FRACTION: draw this share of every batch from an older data dir (same tokenizer) while "
            "continuing training with --init, e.g. --replay data/old:0.1; its val loss is logged as replay_val_loss."
        ),
    ] = None,
    curriculum: Annotated[
        str | None,
        typer.Option(
            help="decomposition: batches of single-document chunks of one power-of-two length each, constant "
            "tokens per step (Dataset Decomposition); none (default): random windows."
        ),
    ] = None,
    reweight: Annotated[
        str | None, typer.Option(help="loss: weight each sequence by softmax(its loss / temperature); none (default).")
    ] = None,
    reweight_temperature: Annotated[float | None, typer.Option(help="Temperature of --reweight loss.")] = None,
    mix: Annotated[
        str | None,
        typer.Option(
            help="DOMAIN=SHARE,...: draw batches from DATA's domains (its sources) at these shares, e.g. "
            "--mix code=0.7,papers=0.3 (normalised to sum to 1; unnamed domains unused); realised shares are logged "
            "as share/DOMAIN, each domain's val loss as val_loss/DOMAIN."
        ),
    ] = None,
    context: Annotated[
        int | None,
        typer.Option(help="With --init: extend the model's context to N positions first (default --seq-len N)."),
    ] = None,
    rope: Annotated[
        str | None, typer.Option(help="How --context stretches rotary positions: yarn (default), linear or dynamic.")
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            help="muon (default; Muon for hidden matrices, AdamW for the rest; adamw under --strategy fsdp) or adamw."
        ),
    ] = None,
) -> None:
    """Train a model on DATA within a budget; checkpoints are resumable with --resume."""
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train as run_training
    from slmkit.ui import RichReporter

    options = {
        "lr": lr,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "grad_accum": grad_accum,
        "warmup_steps": warmup_steps,
        "schedule": schedule,
        "max_steps": max_steps,
        "max_tokens": max_tokens,
        "max_minutes": max_minutes,
        "max_flops": max_flops,
        "eval_interval": eval_interval,
        "save_interval": save_interval,
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "preset": preset,
        "strategy": strategy,
        "init": str(init) if init is not None else None,
        **_parse_replay(replay),
        "curriculum": curriculum,
        "reweight": reweight,
        "reweight_temperature": reweight_temperature,
        **parse_mix(mix),
        "context": context,
        "rope": rope,
        "optimizer": optimizer,
    }
    given = {k: v for k, v in options.items() if v is not None}
    if compile:
        given["compile"] = True
    if init is not None and (preset is not None or set_):
        raise UserError("--init gives the model: drop --preset and --set")
    if init is not None and seq_len is None and not resume:  # at most the model's context (the new one: --context)
        given["seq_len"] = context if context is not None else _context_of(init, TrainConfig.seq_len)
    if resume:
        keys = ("max_steps", "max_tokens", "max_minutes", "max_flops", "strategy")
        budgets = {k: given[k] for k in keys if k in given}
        result = run_training(TrainConfig(), data, out, resume=True, reporter=RichReporter(), budget_overrides=budgets)
    else:
        base = TrainConfig.from_yaml(config).to_dict() if config else {}
        model_overrides = {**base.get("model", {}), **_parse_sets(set_)}
        cfg = TrainConfig.from_dict({**base, **given, "model": model_overrides})
        result = run_training(cfg, data, out, reporter=RichReporter(), overwrite=overwrite)
    if result.stop_reason == "interrupted":
        _console(stderr=True).print(
            f"interrupted at step {result.step}; continue with: slm train --data {data} --out {out} --resume"
        )
        raise typer.Exit(130)


@app.command()
def generate(
    model: Annotated[Path, typer.Argument(help="Model dir, or run dir (its latest checkpoint).")],
    prompt: Annotated[str | None, typer.Option(help="Text to continue.")] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(help="Many prompts, generated in batches: a .txt (one per line) or .jsonl ({'prompt': ...})."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = defaults.MAX_NEW_TOKENS,
    temperature: Annotated[
        float, typer.Option(help="0 = greedy; e.g. 0.8 samples (with --seed to repeat a sample).")
    ] = defaults.TEMPERATURE,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = defaults.TOP_K,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass in (0, 1].")] = defaults.TOP_P,
    min_p: Annotated[
        float | None, typer.Option(help="Drop tokens below min-p x p(most likely token).")
    ] = defaults.MIN_P,
    repetition_penalty: Annotated[
        float, typer.Option(help="> 1 discourages repeats of prompt/output tokens.")
    ] = defaults.REPETITION_PENALTY,
    frequency_penalty: Annotated[
        float, typer.Option(help="Subtract this per earlier occurrence, in [-2, 2].")
    ] = defaults.FREQUENCY_PENALTY,
    presence_penalty: Annotated[
        float, typer.Option(help="Subtract this once per seen token, in [-2, 2].")
    ] = defaults.PRESENCE_PENALTY,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str], typer.Option(help="Stop at this string (repeatable).")] = [],  # noqa: B006
    draft: Annotated[
        Path | None, typer.Option(help="Speculative decoding with this smaller model (same tokenizer).")
    ] = None,
    lookup: Annotated[
        bool, typer.Option("--lookup", help="Speculative decoding from n-gram matches in prompt and output.")
    ] = False,
    speculate: Annotated[
        str | None,
        typer.Option(
            help="Speculative decoding: lookup (as --lookup), recycle (drafts from the model's own past top-k next "
            "tokens, token recycling), tree (recycle drafts as a tree verified in one pass; greedy, attention "
            "models; others fall back to recycle), draft (needs --draft) or off."
        ),
    ] = None,
    speculate_k: Annotated[
        int | None,
        typer.Option(
            help="Tokens drafted per verification (default 4 with --draft, 8 with --lookup; with tree: the most "
            "depths of the tree template, default all)."
        ),
    ] = None,
    tree_widths: Annotated[
        str | None,
        typer.Option(help="With --speculate tree: children per node at each depth, e.g. 4,2,1,1,1,1 (the default)."),
    ] = None,
    min_speedup: Annotated[
        float,
        typer.Option(
            help="Speculation turns itself off after 8 rounds that produced tokens slower than this many times the "
            "timed plain steps' rate (on a CPU a small model's verification pass can cost more than it saves); "
            "0 keeps it on."
        ),
    ] = 1.0,
    json_schema: Annotated[Path | None, typer.Option(help="Constrain the output to this JSON schema file.")] = None,
    regex: Annotated[str | None, typer.Option(help="Constrain the output to this regular expression.")] = None,
    grammar: Annotated[Path | None, typer.Option(help="Constrain the output to this EBNF (GBNF) grammar file.")] = None,
    logprobs: Annotated[bool, typer.Option("--logprobs", help="Print JSON with each token's log-probability.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt.")] = False,
    truncate: Annotated[
        bool, typer.Option("--truncate", help="Drop the start of a prompt that does not fit the context.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch with --prompts-file.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, else float32), float32, bfloat16.")] = "auto",
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the decode step: CUDA graphs on CUDA (default: on with --prompts-file), C++ kernels "
            "on a CPU (default off: a one-time 15-40 s compilation, then faster steps on small models).",
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Print timing, acceptance rate and speedup after the text.")
    ] = False,
    kv_window: KVWindow = None,
    kv_sinks: KVSinks = 0,
    kv_dtype: KVDtype = "auto",
    kv_prune_keys: KVPruneKeys = 0.0,
    kv_memory: KVMemory = None,
    kv_block: KVBlock = None,
    kv_memory_blocks: KVMemoryBlocks = None,
) -> None:
    """Continue PROMPT with MODEL, streaming text to the terminal (or JSON lines for --prompts-file / --json)."""
    from slmkit.infer.constrained import constraint_from_options
    from slmkit.infer.engine import Engine, EngineStats, read_prompts
    from slmkit.infer.sampling import SamplingParams

    if (prompt is None) == (prompts_file is None):
        raise UserError("give exactly one of --prompt TEXT and --prompts-file FILE")
    if draft is not None and lookup:
        raise UserError("choose one kind of speculation: --draft MODEL or --lookup, not both")
    chosen = "draft" if draft is not None else "lookup" if lookup else "off"
    if speculate is not None:
        if speculate not in ("off", "lookup", "recycle", "tree", "draft"):
            raise UserError(f"--speculate must be off, lookup, recycle, tree or draft, got {speculate!r}")
        if speculate == "draft" and draft is None:
            raise UserError("--speculate draft needs a draft model: --draft MODEL")
        if chosen != "off" and speculate != chosen:
            raise UserError(f"--speculate {speculate} conflicts with --{chosen}: choose one kind of speculation")
        chosen = speculate
    if tree_widths is not None:
        from slmkit.infer.speculative import parse_tree_widths

        if chosen != "tree":
            raise UserError("--tree-widths goes with --speculate tree")
        try:
            parse_tree_widths(tree_widths)
        except ValueError as exc:
            raise UserError(f"--{exc}") from None
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
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
    constraint = constraint_from_options(
        str(json_schema) if json_schema else None, regex, str(grammar) if grammar else None
    )
    prompts = read_prompts(prompts_file) if prompts_file is not None else [prompt or ""]
    if compile is None and prompts_file is None:
        compile = False  # one prompt: compilation (seconds) would cost more than it saves
    kv_cache = kv_cache_spec(kv_window, kv_sinks, kv_dtype, kv_prune_keys, kv_memory, kv_block, kv_memory_blocks)
    engine = Engine.load(model, draft=draft, device=device, dtype=dtype, compile=compile, kv_cache=kv_cache)
    options = dict(
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop=stop,
        logprobs=logprobs,
        truncate=truncate,
        constraint=constraint,
        speculate=chosen,
        speculate_k=speculate_k,
        **({"tree_widths": tree_widths} if tree_widths is not None else {}),
        min_speedup=min_speedup,
    )
    stats = EngineStats()
    if prompts_file is None and not (as_json or logprobs):
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
        for delta in engine.stream(prompts[0], stats=stats, **options):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    else:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            for text, completion in zip(batch, engine.generate(batch, stats=stats, **options), strict=True):
                record = {"prompt": text, **completion.to_dict()}
                print(json.dumps(record, ensure_ascii=False), flush=True)
    if constraint is not None and "length" in stats.finish_reasons:
        _console(stderr=True).print(
            "[yellow]warning: max new tokens ran out before the output was complete; it may not parse[/]"
        )
    if verbose:
        _console(stderr=True).print(f"[dim]{stats.summary()}[/]")


@app.command("eval")
def eval_command(
    models: Annotated[
        list[Path], typer.Argument(help="Model dirs or run dirs (their latest checkpoint); several to compare.")
    ],
    data: Annotated[list[Path], typer.Option(help="A data dir (its val split) or text files (repeatable).")] = [],  # noqa: B006
    split: Annotated[str, typer.Option(help="Split of a data dir: val or train.")] = "val",
    seq_len: Annotated[int | None, typer.Option(help="Window length (default: the model's context).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows (or scored sequences) per forward pass.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    tasks: Annotated[
        list[str], typer.Option("--tasks", help="Task file (.jsonl) or built-in task name (repeatable).")
    ] = [],  # noqa: B006
    suite: Annotated[str | None, typer.Option(help="builtin: the offline suite built from real text.")] = None,
    corpus: Annotated[list[str], typer.Option(help="Text source for the corpus-* built-in tasks (repeatable).")] = [],  # noqa: B006
    suite_size: Annotated[int, typer.Option(help="Examples per built-in task.")] = 100,
    template: Annotated[
        list[str],
        typer.Option(
            "--template", help="Prompt template(s): plain, instruct, qa, letters (lettered choices); default: first 3."
        ),
    ] = [],  # noqa: B006
    num_fewshot: Annotated[
        int | None,
        typer.Option(help="Few-shot examples per prompt (default 0; 5 curated with --olmes, else drawn with --seed)."),
    ] = None,
    olmes: Annotated[
        bool,
        typer.Option(
            "--olmes",
            help="OLMES-style: multiple choice scored as cloze and as lettered choices (the better reported, both "
            "shown), with fixed curated few-shot examples.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for few-shot draws, built-in tasks and bootstrap.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Score only the first N examples of each task.")] = None,
    efficiency: Annotated[
        bool, typer.Option("--efficiency", help="Measure latency, throughput and memory (fresh process per model).")
    ] = False,
    report: Annotated[Path | None, typer.Option(help="Write report.json and report.html into this directory.")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads (default: torch's choice).")] = None,
    contamination_data: Annotated[
        Path | None,
        typer.Option(help="A data dir (what the model trained on): report each task's n-gram overlap with it."),
    ] = None,
    contamination_n: Annotated[int, typer.Option(help="Words per n-gram of --contamination-data.")] = 13,
    kv_window: Annotated[
        int | None, typer.Option(help="With --efficiency: a KV cache of the last N positions (+ --kv-sinks).")
    ] = None,
    kv_sinks: Annotated[int, typer.Option(help="With --efficiency and --kv-window: keep the first S too.")] = 0,
    kv_dtype: Annotated[str, typer.Option(help="With --efficiency: KV cache dtype: auto, int8 or int4.")] = "auto",
    kv_prune_keys: Annotated[
        float, typer.Option(help="With --efficiency: fraction of key channels pruned per head (ThinK).")
    ] = 0.0,
    kv_memory: Annotated[
        int | None, typer.Option(help="With --efficiency and --kv-window: top-K block memory (InfLLM).")
    ] = None,
    kv_block: Annotated[int | None, typer.Option(help="With --kv-memory: positions per memory block.")] = None,
    kv_memory_blocks: Annotated[int | None, typer.Option(help="With --kv-memory: blocks kept at most.")] = None,
    lm_eval_tasks: Annotated[
        list[str],
        typer.Option("--lm-eval", help="lm-eval task or group name(s) to run through slmkit's adapter (repeatable)."),
    ] = [],  # noqa: B006
    lm_eval_include: Annotated[
        list[Path], typer.Option("--lm-eval-include", help="A directory of local lm-eval task YAMLs (repeatable).")
    ] = [],  # noqa: B006
    compare: Annotated[
        Path | None,
        typer.Option(help="Base model: report each model's task delta and answer flips (MUSCLE) against it."),
    ] = None,
) -> None:
    """Perplexity and bits/byte on text, task accuracy with 95% CIs, and measured efficiency of MODELS.

    With one model and only --data, prints what it always has (a table, or --json: loss, perplexity,
    bits_per_byte, tokens, bytes). With --lm-eval, runs lm-eval's own tasks instead (needs the lm-eval extra).
    """
    from slmkit.eval.cli_support import run_eval_command, run_lm_eval_command
    from slmkit.eval.tasks import OLMES_SHOTS

    if lm_eval_tasks or lm_eval_include:
        others = {"--data": data, "--tasks": tasks, "--suite": suite, "--template": template,
                  "--efficiency": efficiency, "--report": report, "--compare": compare,
                  "--olmes": olmes}  # fmt: skip
        run_lm_eval_command(
            models, lm_eval_tasks, lm_eval_include, [k for k, v in others.items() if v], num_fewshot, limit,
            batch_size, threads, as_json, console=_console(),
        )  # fmt: skip
        return
    if report is not None:  # before the evaluation: minutes of work must not end in an unwritable path
        from slmkit.interop.outputs import check_output

        check_output(report, "dir", overwrite=True, option="--report")
    run_eval_command(
        models,
        data,
        split,
        seq_len,
        batch_size,
        as_json,
        tasks,
        suite,
        corpus,
        suite_size,
        template,
        num_fewshot if num_fewshot is not None else (OLMES_SHOTS if olmes else 0),
        seed,
        limit,
        efficiency,
        report,
        threads,
        console=_console(),
        err_console=_console(stderr=True),
        contamination_data=contamination_data,
        contamination_n=contamination_n,
        kv_cache=kv_cache_spec(kv_window, kv_sinks, kv_dtype, kv_prune_keys, kv_memory, kv_block, kv_memory_blocks),
        compare=compare,
        olmes=olmes,
    )


@app.command()
def card(
    model: Annotated[Path, typer.Argument(help="Model dir, or run dir (its latest checkpoint).")],
    report: Annotated[
        Path | None, typer.Option(help="report.json (or its directory) from `slm eval --report`.")
    ] = None,
    license: Annotated[str | None, typer.Option(help="License id for the card's metadata, e.g. apache-2.0.")] = None,
) -> None:
    """Write or update MODEL/README.md as a Hugging Face model card (config, training, evaluation, efficiency)."""
    from slmkit.eval.card import write_card
    from slmkit.interop.checkpoint import resolve_model_dir
    from slmkit.interop.outputs import check_output

    check_output(resolve_model_dir(model) / "README.md", "file", overwrite=True, option="card")
    path = write_card(model, report, license)
    print(path)


@data_app.command("clean")
def data_clean(
    sources: Annotated[
        list[str], typer.Argument(help="Files (.txt .md .jsonl .parquet .py), directories, or builtin:pystdlib.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output directory: NAME.jsonl per source and report.json.")],
    near_dup_threshold: Annotated[
        float, typer.Option(help="Drop a document whose MinHash Jaccard with a kept one is at least this, in (0, 1).")
    ] = 0.8,
    quality: Annotated[
        bool, typer.Option("--quality/--no-quality", help="Apply the heuristic quality rules (off for code).")
    ] = True,
    threshold: Annotated[
        list[str], typer.Option("--threshold", help="Change one quality threshold, NAME=VALUE (repeatable).")
    ] = [],  # noqa: B006
    text_field: Annotated[str, typer.Option(help="Field of .jsonl records / column of .parquet files.")] = "text",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace what is already in --out.")] = False,
) -> None:
    """Drop low-quality documents, exact and near duplicates of SOURCES; write the rest and a report to --out.

    The report (report.json, or --json) counts what was dropped per reason, with examples; `slm data prepare OUT`
    reads the kept documents. See docs/data.md for the rules and their default thresholds.
    """
    from slmkit.data.clean import QualityThresholds, check_threshold, clean
    from slmkit.interop.outputs import check_output

    check_threshold(near_dup_threshold)
    thresholds = QualityThresholds.parse(threshold)
    check_output(out, "dir", overwrite=overwrite)
    err = _console(stderr=True)
    report = clean(
        sources,
        out,
        near_dup_threshold=near_dup_threshold,
        quality=quality,
        thresholds=thresholds,
        text_field=text_field,
        on_status=(lambda msg: err.print(f"[dim]{msg}[/]")) if err.is_terminal and not as_json else None,
    )
    if as_json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return
    from rich.table import Table

    table = Table(title=f"{out}: kept {report.kept:,} of {report.documents:,} documents")
    for col in ("dropped because", "documents", "example"):
        table.add_column(col, justify="right" if col == "documents" else "left")
    for reason, count in report.dropped.items():
        example = report.examples.get(reason, [{}])[0]
        table.add_row(reason, f"{count:,}", f"{example.get('detail', '')}: {example.get('text', '')[:60]}")
    _console().print(table)
    _console().print(f"report: {out / 'report.json'}")


@data_app.command("contamination")
def data_contamination(
    data: Annotated[Path, typer.Argument(help="A data dir from `slm data prepare` (its train split is read).")],
    tasks: Annotated[
        list[str], typer.Option("--tasks", help="Task file (.jsonl) or built-in task name (repeatable).")
    ] = [],  # noqa: B006
    n: Annotated[int, typer.Option("--n", help="Words per n-gram (13 as GPT-3; smaller for short items).")] = 13,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Share of each task's items that share an n-gram of normalised words with the training data."""
    from slmkit.data.contamination import check_n, contamination
    from slmkit.eval.builtin import resolve_tasks

    check_n(n)
    if not tasks:
        raise UserError("no tasks given; pass one or more task files with --tasks")
    task_list = resolve_tasks(tasks)
    results = contamination(data, [(t.name, t.examples) for t in task_list], n=n)
    if as_json:
        print(json.dumps({"data": str(data), "n": n, "tasks": [r.to_dict() for r in results]}))
        return
    from rich.table import Table

    table = Table(title=f"{n}-gram overlap with {data} (train split)")
    for col in ("task", "items", "contaminated", "rate"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in results:
        table.add_row(r.task, f"{r.items:,}", f"{r.contaminated:,}", f"{r.rate:.1%}")
    _console().print(table)


@app.command()
def compress(
    model: Annotated[Path, typer.Argument(help="Model dir, or run dir (its latest checkpoint).")],
    method: Annotated[
        str,
        typer.Option(
            help="int8, int4, gptq-int4, awq-int4, prune-magnitude, prune-wanda, prune-2:4, prune-structured, lowrank, "
            "moe-carve, vocab-trim."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output model directory (written atomically).")],
    data: Annotated[
        Path | None, typer.Option(help="Data dir: calibration windows (train split), before/after scores (val).")
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(help="int4: inputs per scale/zero group (default 128, less where 128 won't fit)."),
    ] = None,
    outliers: Annotated[float, typer.Option(help="int4: share of weights kept in fp16 (SpQR-style).")] = 0.0,
    activations: Annotated[
        str, typer.Option(help="int8: none (weight-only) or dynamic (W8A8, activations quantized per call on CPU).")
    ] = "none",
    embeddings: Annotated[
        str, typer.Option(help="Quantized methods: token embedding / tied head as int8 rows (default) or int4.")
    ] = "int8",
    sparsity: Annotated[float, typer.Option(help="prune-magnitude / prune-wanda: share of weights zeroed.")] = 0.5,
    heads_keep: Annotated[float, typer.Option(help="prune-structured: share of attention heads kept.")] = 1.0,
    ffn_keep: Annotated[float, typer.Option(help="prune-structured: share of FFN channels kept.")] = 1.0,
    drop_layers: Annotated[int, typer.Option(help="prune-structured: number of whole layers removed.")] = 0,
    energy: Annotated[float, typer.Option(help="lowrank: share of squared singular values kept per layer.")] = 0.9,
    experts: Annotated[int, typer.Option(help="moe-carve: routed experts per layer (must divide d_ff - shared).")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", help="moe-carve: routed experts each token uses.")] = 2,
    shared: Annotated[int, typer.Option(help="moe-carve: neurons in the always-on shared expert (0: none).")] = 0,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows from the train split.")] = 128,
    calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    eval_windows: Annotated[int | None, typer.Option(help="Val windows scored before/after (default: all).")] = None,
    measure: Annotated[
        bool, typer.Option("--measure/--no-measure", help="Measure peak memory and decode speed in a subprocess.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace what is already at --out (never a file by a directory).")
    ] = False,
) -> None:
    """Quantize, prune, factorize or carve into experts MODEL into OUT; prints before/after quality, size, memory,
    speed."""
    from slmkit.compress.pipeline import CompressOptions
    from slmkit.compress.pipeline import compress as run_compress

    options = CompressOptions(
        group_size=group_size,
        outliers=outliers,
        activations=activations,
        embeddings=embeddings,
        sparsity=sparsity,
        heads_keep=heads_keep,
        ffn_keep=ffn_keep,
        drop_layers=drop_layers,
        energy=energy,
        experts=experts,
        top_k=top_k,
        shared=shared,
        calib_samples=calib_samples,
        calib_seq_len=calib_seq_len,
    )
    result = run_compress(
        model, method, out, data=data, options=options, measure=measure, eval_windows=eval_windows, overwrite=overwrite
    )
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    from rich.table import Table

    def fmt(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    table = Table(title=f"{method}: {model} -> {out}  ({result.seconds:.1f} s)")
    columns = ("", "perplexity", "bits/byte", "file MB", "tensors MB", "peak RSS MB", "load+decode MB", "decode tok/s")
    for col in columns:
        table.add_column(col, justify="right")
    for name, m in (("before", result.before), ("after", result.after)):
        table.add_row(
            name,
            fmt(m.perplexity, ".3f"),
            fmt(m.bits_per_byte, ".4f"),
            f"{m.size_bytes / 1e6:.2f}",
            fmt(m.weights_memory_mb, ".2f"),
            fmt(m.peak_memory_mb, ".0f"),
            fmt(m.model_memory_mb, ".1f"),
            fmt(m.decode_tokens_per_second, ".1f"),
        )
    _console().print(table)
    b, a = result.before, result.after
    notes = [f"size {b.size_bytes / max(a.size_bytes, 1):.2f}x smaller"]
    if b.perplexity and a.perplexity:
        notes.append(f"perplexity {100 * (a.perplexity / b.perplexity - 1):+.2f}%")
    if "vocab_after" in result.record:
        r = result.record
        notes.append(
            f"vocabulary {r['vocab_before']:,} -> {r['vocab_after']:,} tokens, parameters {r['parameters_before']:,} "
            f"-> {r['parameters_after']:,}"
        )
    _console().print("; ".join(notes))


@app.command()
def upcycle(
    model: Annotated[Path, typer.Argument(help="A dense model dir (or run dir) with gated MLPs.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the mixture-of-experts model.")],
    experts: Annotated[int, typer.Option(help="Experts per layer, each a copy of the layer's MLP.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", help="Experts each token uses.")] = 2,
    noise: Annotated[
        float, typer.Option(help="Relative noise on the expert copies (0: the output equals the dense model's).")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the router (and noise).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace what is already in --out.")] = False,
) -> None:
    """Sparse upcycling: copy each layer's MLP into experts and add a router; then `slm train --init OUT`."""
    from slmkit.compress.moe import upcycle as run_upcycle

    result = run_upcycle(model, out, experts, top_k, noise=noise, seed=seed, overwrite=overwrite)
    print(
        f"wrote {result.out}: {result.experts} experts, top-{result.top_k}; {result.params_before:,} -> "
        f"{result.params_after:,} parameters ({result.active_params:,} per token). "
        f"Train it with: slm train --init {result.out} --data DATA --out RUN --max-steps N"
    )


@app.command("merge-adapter")
def merge_adapter(
    base: Annotated[Path, typer.Argument(help="The base model dir (or run dir) the adapter was trained on.")],
    adapter: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter dir (slmkit's or peft's save_pretrained).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the merged model.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace what is already in --out.")] = False,
) -> None:
    """Fold a LoRA adapter into its base: a plain model dir (W + scale * B @ A) that transformers loads."""
    from slmkit.api import merge_adapter as run_merge

    result = run_merge(base, adapter, out, overwrite=overwrite)
    note = " (the compressed base dequantized to float)" if result.dequantized else ""
    print(f"wrote {result.out}: adapter merged into {result.layers} layers{note}")


@app.command()
def finetune(
    model: Annotated[Path, typer.Argument(help="Model dir (or run dir) to start from; a quantized one with --lora.")],
    data: Annotated[
        Path | None, typer.Option("--data", help="JSONL: {messages: [...]} or {prompt, completion} per line.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run dir: checkpoints/, metrics.jsonl, final/.")] = None,
    lora: Annotated[
        bool, typer.Option("--lora", help="Train LoRA adapters only (PEFT files); QLoRA on a quantized model.")
    ] = False,
    nola: Annotated[
        bool, typer.Option("--nola", help="NOLA adapters: LoRA factors as mixtures of seeded random bases.")
    ] = False,
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="Adapter rank.")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="Adapter scale numerator (alpha / r).")] = None,
    rslora: Annotated[bool, typer.Option("--rslora", help="rsLoRA: scale by alpha / sqrt(r).")] = False,
    target_modules: Annotated[
        str | None, typer.Option("--target-modules", help="Comma-separated module names (q_proj,v_proj) or all-linear.")
    ] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="Dropout on the adapter's input.")] = None,
    loss_on_prompt: Annotated[
        bool, typer.Option("--loss-on-prompt", help="Train on every token, not only the assistant's.")
    ] = False,
    pack: Annotated[
        bool | None, typer.Option("--pack/--no-pack", help="Pack samples into rows (default: when the model can).")
    ] = None,
    val_data: Annotated[
        Path | None, typer.Option(help="Validation JSONL (default: a held-out share of --data).")
    ] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Share of samples held out for validation.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 1e-4; 1e-3 with adapters).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per micro-batch.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per row (longer samples are cut).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine, wsd or constant.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Budget: optimizer steps.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Budget: training tokens (rows x seq-len).")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Budget: wall-clock minutes.")] = None,
    eval_interval: Annotated[int | None, typer.Option(help="Evaluate on validation every N steps.")] = None,
    save_interval: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (split, order, adapter init).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier run (or other files) in --out instead of refusing.")
    ] = False,
    context: Annotated[
        int | None,
        typer.Option(help="Extend the model's context to N positions before training (default --seq-len N)."),
    ] = None,
    rope: Annotated[
        str | None, typer.Option(help="How --context stretches rotary positions: yarn (default), linear or dynamic.")
    ] = None,
) -> None:
    """Fine-tune MODEL on chat or prompt/completion samples (loss on the answers), fully or with LoRA/NOLA adapters."""
    from slmkit.api import finetune as run_finetune
    from slmkit.train.finetune import FinetuneConfig
    from slmkit.ui import RichReporter

    if out is None:
        raise UserError("give --out DIR (the run dir)")
    options = {
        "lr": lr,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "grad_accum": grad_accum,
        "warmup_steps": warmup_steps,
        "schedule": schedule,
        "max_steps": max_steps,
        "max_tokens": max_tokens,
        "max_minutes": max_minutes,
        "eval_interval": eval_interval,
        "save_interval": save_interval,
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "val_fraction": val_fraction,
        "val_data": str(val_data) if val_data is not None else None,
        "pack": pack,
        "context": context,
        "rope": rope,
    }
    given = {k: v for k, v in options.items() if v is not None}
    if resume:
        budgets = {k: given[k] for k in ("max_steps", "max_tokens", "max_minutes") if k in given}
        result = run_finetune(None, out, resume=True, reporter=RichReporter(), budget_overrides=budgets)
    else:
        if data is None:
            raise UserError("give --data FILE.jsonl (the fine-tuning samples)")
        adapter: dict[str, Any] | None = None
        if lora or nola:
            adapter = {"kind": "nola" if nola else "lora", "use_rslora": rslora}
            if rank is not None:
                adapter["r"] = rank
            if alpha is not None:
                adapter["alpha"] = alpha
            if lora_dropout is not None:
                adapter["dropout"] = lora_dropout
            if target_modules is not None:
                names = [t.strip() for t in target_modules.split(",") if t.strip()]
                adapter["target_modules"] = names[0] if names == ["all-linear"] else names
            given.setdefault("lr", 1e-3)
            given.setdefault("weight_decay", 0.0)
        elif rank is not None or alpha is not None or rslora or target_modules or lora_dropout is not None:
            raise UserError("--rank, --alpha, --rslora, --target-modules and --lora-dropout need --lora or --nola")
        if seq_len is None:  # the model's context, up to 1024 tokens (the new context with --context)
            given["seq_len"] = context if context is not None else _context_of(model, 1024)
        cfg = FinetuneConfig.from_dict(
            {**given, "init": str(model), "data": str(data), "loss_on_prompt": loss_on_prompt, "lora": adapter}
        )
        result = run_finetune(cfg, out, reporter=RichReporter(), overwrite=overwrite)
    if result.stop_reason == "interrupted":
        _console(stderr=True).print(
            f"interrupted at step {result.step}; continue with: slm finetune {model} --out {out} --resume"
        )
        raise typer.Exit(130)


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="A merge config in mergekit's YAML shape (see docs/finetuning.md).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the merged model.")],
    seed: Annotated[int, typer.Option(help="Seed of DARE's random drops (dare_linear, dare_ties).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace what is already in --out.")] = False,
) -> None:
    """Merge models: linear, task_arithmetic, ties, dare_linear, dare_ties, model_stock or slerp."""
    from slmkit.api import merge as run_merge

    result = run_merge(config, out, seed=seed, overwrite=overwrite)
    base = f" onto base {result.base}" if result.base else ""
    print(
        f"merged {len(result.models)} model(s) ({', '.join(result.models)}){base} with {result.method} "
        f"into {result.out} ({result.tensors} tensors, {result.dtype})"
    )


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option(help="Teacher model dir (or run dir).")],
    data: Annotated[Path, typer.Option("--data", help="Data dir tokenized with the teacher's tokenizer.")],
    out: Annotated[Path, typer.Option("--out", help="Run dir: checkpoints/, metrics.jsonl, final/.")],
    student: Annotated[
        str | None, typer.Option(help="Student model dir (e.g. a pruned model) or a preset name.")
    ] = None,
    student_config: Annotated[
        Path | None,
        typer.Option(
            help="Student model config (YAML/JSON: optional `preset` + ModelConfig fields, e.g. a hybrid); "
            "the teacher's embeddings, norms, MLPs and same-kind mixers are copied in first."
        ),
    ] = None,
    align_steps: Annotated[
        int, typer.Option(help="Steps of per-layer hidden-state alignment to the teacher before logit distillation.")
    ] = 0,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the KL term.")] = 2.0,
    alpha: Annotated[float, typer.Option(help="Weight of the KL term; 1 - alpha goes to the LM loss.")] = 0.5,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Budget: optimizer steps.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Budget: training tokens.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Budget: wall-clock minutes.")] = None,
    save_interval: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (student init and data order).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="muon (default; as slm train) or adamw.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier run (or other files) in --out instead of refusing.")
    ] = False,
) -> None:
    """Distil TEACHER into STUDENT on DATA (KL on temperature-softened logits, mixed with the LM loss)."""
    from slmkit.compress.distill import distill as run_distill
    from slmkit.train.config import TrainConfig

    options = {
        "lr": lr,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "warmup_steps": warmup_steps,
        "max_steps": max_steps,
        "max_tokens": max_tokens,
        "max_minutes": max_minutes,
        "save_interval": save_interval,
        "seed": seed,
        "optimizer": optimizer,
        "device": device,
    }
    given = {k: v for k, v in options.items() if v is not None}
    budgets = {k: given[k] for k in ("max_steps", "max_tokens", "max_minutes") if k in given}
    cfg = None if resume else TrainConfig.from_dict(given)
    result = run_distill(
        teacher,
        student,
        data,
        out,
        cfg,
        temperature,
        alpha,
        resume=resume,
        budget_overrides=budgets,
        overwrite=overwrite,
        student_config=student_config,
        align_steps=align_steps,
    )
    if result.transfer is not None:
        _console().print(f"transfer: {result.transfer.summary()} (listed in {out}/distill_config.json)")
    where = result.final_dir or result.run_dir
    line = f"stopped ({result.stop_reason}) at step {result.step}, {result.tokens:,} tokens, {result.seconds:.0f} s"
    if result.val_loss is not None and result.teacher_val_loss is not None:
        line += f"; val loss student {result.val_loss:.4f}, teacher {result.teacher_val_loss:.4f}"
    _console().print(f"{line}; saved to {where}")


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Where to write data and the run.")] = Path("runs/quickstart"),
    minutes: Annotated[float, typer.Option(help="Training budget in wall-clock minutes.")] = 5.0,
    preset: Annotated[str, typer.Option(help="Model preset.")] = "micro",
) -> None:
    """The main job: prepare builtin:pystdlib, train a small model, evaluate it, generate samples."""
    from slmkit.quickstart import run_quickstart

    run_quickstart(out, minutes=minutes, preset=preset, console=_console())


@app.command("build")
def build_command(
    data: Annotated[
        list[str],
        typer.Option("--data", help="A data dir (`slm data prepare`) or sources to prepare (files, builtin:pystdlib)."),
    ],
    budget: Annotated[str, typer.Option(help="Wall-clock budget of the whole build: 90s, 30m, 1.5h, 1h30m.")],
    out: Annotated[Path, typer.Option("--out", help="Where the shipped model, card, build.json and report go.")],
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    max_latency: Annotated[
        str | None, typer.Option(help="Most decode time per token at batch 1 here, e.g. 5ms.")
    ] = None,
    max_size: Annotated[str | None, typer.Option(help="Most bytes of weights, e.g. 20MB.")] = None,
    tasks: Annotated[
        list[str], typer.Option("--tasks", help="Task files (.jsonl) or built-in tasks to evaluate (repeatable).")
    ] = [],  # noqa: B006
    mixer: Annotated[
        str,
        typer.Option(
            help="Family: attention, hybrid, moe, mamba2, ... (several joined by ;), or auto: attention, hybrid, moe."
        ),
    ] = "attention",
    fit: Annotated[
        list[Path], typer.Option("--fit", help="Plan on this ladder (`slm ladder`) instead of running one.")
    ] = [],  # noqa: B006
    machine: Annotated[
        Path | None, typer.Option(help="Replay the machine measurements of an earlier build.json (same plan).")
    ] = None,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary when --data are sources to prepare.")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed of the ladder, training and calibration.")] = 1337,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads for every stage (default: torch's).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the build in --out from its last step.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace what is already in --out.")] = False,
) -> None:
    """Plan, train, compress, verify and ship the best model for a budget and targets (see docs/build.md)."""
    from slmkit.build.options import BuildRequest, parse_duration, parse_latency, parse_size

    request = BuildRequest(
        data=[str(d) for d in data],
        budget_seconds=parse_duration(budget),
        device=device,
        max_latency_ms=parse_latency(max_latency) if max_latency is not None else None,
        max_size_bytes=parse_size(max_size) if max_size is not None else None,
        tasks=list(tasks),
        mixer=mixer,
        seed=seed,
        vocab_size=vocab_size,
        fit=[str(f) for f in fit],
        threads=threads,
    )
    request.mixers()  # a bad --mixer fails here
    profile = None
    if machine is not None:
        from slmkit.build.machine import check_profile

        try:
            profile = check_profile(json.loads(machine.read_text()).get("machine"), str(machine))
        except (OSError, ValueError, AttributeError):
            raise UserError(f"--machine {machine}: not a readable build.json") from None
    from slmkit.build.options import BuildStopped
    from slmkit.build.pipeline import build, process_age, summary_lines
    from slmkit.ui import RichReporter

    console = _console()
    try:
        result = build(
            request,
            out,
            resume=resume,
            overwrite=overwrite,
            machine=profile,
            console=console,
            train_reporter=RichReporter(console),
            startup_seconds=process_age(),  # the budget counts the command's start-up too
        )
    except (KeyboardInterrupt, BuildStopped) as exc:
        print(f"{exc or 'interrupted'}; every finished step is kept: repeat the command with --resume", file=sys.stderr)
        raise typer.Exit(130 if isinstance(exc, KeyboardInterrupt) else 3) from None
    for line in summary_lines(result):
        console.print(line)
    console.print(f"shipped into {out}: model/, hf/, model.gguf, README.md, build.json, report.html")


@app.command("export")
def export_command(
    model: Annotated[Path, typer.Argument(help="Model dir, or run dir (its latest checkpoint).")],
    format: Annotated[str, typer.Option("--format", help="hf (a transformers directory) or gguf (llama.cpp).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (hf) or .gguf file (gguf).")],
    dtype: Annotated[
        str | None,
        typer.Option(
            help="GGUF weights: f32, f16 (default), bf16, q8_0, q4_0, q4_1, q5_0, q5_1, "
            "K-quants q4_k, q5_k, q6_k, or llama.cpp's K-quant mixtures q4_k_m, q5_k_m."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace what is already at --out (never a file by a directory).")
    ] = False,
) -> None:
    """Export MODEL for other runtimes: a Hugging Face directory or one GGUF file (llama.cpp, ollama)."""
    from slmkit.interop.hf import export_model

    written = export_model(model, format, out, dtype, overwrite=overwrite)
    size = (
        sum(p.stat().st_size for p in written.rglob("*") if p.is_file()) if written.is_dir() else written.stat().st_size
    )
    print(f"wrote {written} ({size / 1e6:.1f} MB, {format})")


# ---- scaling: ladders, law fits, budget planner (slmkit.scaling) ------------------------------------
scaling_app = typer.Typer(help="Scaling laws fitted on ladders of small runs.", no_args_is_help=True)
app.add_typer(scaling_app, name="scaling")


@app.command()
def ladder(
    data: Annotated[Path, typer.Option("--data", help="Data dir written by `slm data prepare`.")],
    out: Annotated[Path, typer.Option("--out", help="Ladder dir: ladder.json, ladder.jsonl, runs/.")],
    budget_flops: Annotated[float | None, typer.Option(help="Total training FLOPs of all rungs.")] = None,
    budget_minutes: Annotated[float | None, typer.Option(help="Total wall-clock minutes of all rungs.")] = None,
    sizes: Annotated[
        str | None, typer.Option(help="Model sizes, WIDTHxDEPTH or presets, comma separated (default: chosen).")
    ] = None,
    levels: Annotated[int, typer.Option(help="Compute levels (IsoFLOP groups).")] = 4,
    level_ratio: Annotated[float, typer.Option(help="Compute ratio between levels.")] = 2.0,
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate at width <= 128 (scaled by 128/width above).")] = 3e-3,
    min_steps: Annotated[int, typer.Option(help="Fewest optimizer steps of a rung.")] = 20,
    val_windows: Annotated[int, typer.Option(help="Val windows every rung is evaluated on.")] = 128,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for training.")] = None,
    mixer: Annotated[
        str,
        typer.Option(help="Family of every rung: attention, mamba2, gla, based, hybrid, moe, or a pattern a,b,..."),
    ] = "attention",
) -> None:
    """Train a ladder of small models within a budget (re-run the same command to resume)."""
    from slmkit.scaling.ladder import LadderSettings, run_ladder
    from slmkit.scaling.shapes import parse_mixer, parse_sizes

    mixer = parse_mixer(mixer)
    settings = LadderSettings(
        seq_len=seq_len,
        batch_size=batch_size,
        lr=lr,
        levels=levels,
        level_ratio=level_ratio,
        min_steps=min_steps,
        val_windows=val_windows,
        device=device,
        threads=threads,
    )
    result = run_ladder(
        data,
        out,
        budget_flops=budget_flops,
        budget_minutes=budget_minutes,
        sizes=parse_sizes(sizes) if sizes else None,
        settings=settings,
        progress=True,
        mixer=mixer,
    )
    if result.interrupted:
        _console(stderr=True).print("interrupted; re-run the same command to resume the ladder")
        raise typer.Exit(130)
    budget = result.budget
    if budget.get("budget_seconds"):
        replans = len(budget.get("replans", []))
        _console().print(
            f"spent {budget['spent_seconds'] / 60:.1f} of {budget['budget_seconds'] / 60:.1f} budget minutes "
            f"(planned {budget['planned_seconds'] / 60:.1f}; {replans} re-plan(s), see {out / 'ladder.json'})"
        )
    elif budget.get("budget_flops"):
        _console().print(f"spent {budget['spent_flops']:.3g} of {budget['budget_flops']:.3g} budget FLOPs")
    _console().print(f"{len(result.records)} rungs in {out / 'ladder.jsonl'}; fit them with: slm scaling fit {out}")


@scaling_app.command("fit")
def scaling_fit(
    ladder: Annotated[Path, typer.Argument(help="Ladder dir or its ladder.jsonl.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap refits for the confidence intervals.")] = 100,
    ci: Annotated[float, typer.Option(help="Confidence level of the intervals.")] = 0.95,
    plots: Annotated[Path | None, typer.Option(help="Folder for the PNG plots (default LADDER/plots).")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the plots.")] = False,
    inference_tokens: Annotated[
        float, typer.Option(help="Tokens the model will generate over its life (inference-aware optimum).")
    ] = 1e9,
    target_loss: Annotated[
        float | None, typer.Option(help="Loss the inference-aware optimum must reach (default: frontier at 10x C).")
    ] = None,
) -> None:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to a ladder (Chinchilla approach 3) with a held-out check."""
    from slmkit.scaling.report import fit_ladder, print_fit

    _, summary = fit_ladder(
        ladder,
        bootstrap=bootstrap,
        ci_level=ci,
        plots_dir="" if no_plots else plots,
        inference_tokens=inference_tokens,
        target_loss=target_loss,
    )
    if as_json:
        print(json.dumps(summary))
    else:
        print_fit(summary, _console())


@app.command()
def plan(
    ladder: Annotated[
        list[Path],
        typer.Option(
            "--ladder", help="Ladder dir written by `slm ladder`; repeat it (one per --mixer family) to choose."
        ),
    ],
    budget_flops: Annotated[float | None, typer.Option(help="Training FLOPs of the planned run.")] = None,
    budget_minutes: Annotated[float | None, typer.Option(help="Training minutes on this machine.")] = None,
    max_decode_ms: Annotated[float | None, typer.Option(help="Most milliseconds per decoded token here.")] = None,
    max_params: Annotated[float | None, typer.Option(help="Most parameters (total, embeddings included).")] = None,
    write_config: Annotated[Path | None, typer.Option(help="Write a YAML config for `slm train --config`.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap refits for the loss interval.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Recommend a model shape and token count for a budget, with predicted loss and decode latency."""
    from slmkit.scaling.planner import plan as make_plan
    from slmkit.scaling.planner import print_plan
    from slmkit.scaling.planner import write_config as write_yaml

    result = make_plan(
        ladder,
        budget_flops=budget_flops,
        budget_minutes=budget_minutes,
        max_decode_ms=max_decode_ms,
        max_params=max_params,
        bootstrap=bootstrap,
    )
    written = write_yaml(result, write_config) if write_config else None
    if as_json:
        print(json.dumps({**result.to_dict(), "config_file": str(written) if written else None}))
        return
    print_plan(result, _console())
    if written:
        _console().print(f"wrote {written}; train it with: slm train --data DATA --out RUN --config {written}")


route_app = typer.Typer(
    help="Route between a small (weak) and a large (strong) model: learned routers, cascades, token-level routing.",
    no_args_is_help=True,
)
app.add_typer(route_app, name="route")
RouteTasks = Annotated[
    list[str], typer.Option("--tasks", help="Task file (.jsonl) or built-in task name (repeatable).")
]


@route_app.command("train")
def route_train(
    weak: Annotated[Path, typer.Option(help="The weak (small, cheap) model dir or run dir.")],
    strong: Annotated[Path, typer.Option(help="The strong (large) model dir or run dir.")],
    tasks: RouteTasks,
    out: Annotated[Path, typer.Option(help="Router directory to write (router.json + router.safetensors).")],
    target_strong_share: Annotated[
        float, typer.Option(help="Calibrate the threshold so this share of held-out prompts goes to the strong model.")
    ] = 0.3,
    classifier: Annotated[str, typer.Option(help="logreg (logistic regression) or mlp (one hidden layer).")] = "logreg",
    template: Annotated[str, typer.Option(help="Prompt template: plain, instruct, qa (or letters).")] = "plain",
    suite_size: Annotated[int, typer.Option(help="Examples per built-in task.")] = 100,
    fit_fraction: Annotated[
        float, typer.Option(help="Share of items (by a hash of each) the router is fitted on.")
    ] = 0.6,
    seed: Annotated[int, typer.Option(help="Seed for built-in tasks and the fit.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print router.json's contents as one JSON object.")] = False,
) -> None:
    """Fit a learned router from both models' per-item quality on TASKS (features: the weak model's hidden states)."""
    from slmkit.route.train import train_router

    err = _console(stderr=True)
    meta = train_router(
        weak, strong, tasks, out, target_strong_share, classifier, template, suite_size, seed, fit_fraction,
        batch_size, overwrite=overwrite, on_status=lambda m: err.print(f"[dim]{m}[/]"),
    )  # fmt: skip
    if as_json:
        print(json.dumps(meta))
        return
    held, trained = meta["held_out"], meta["trained"]
    _console().print(
        f"router written to {out}: {meta['classifier']}, threshold {meta['threshold']:.4f}; fitted on "
        f"{trained['fit_items']} items, held out {trained['held_out_items']}: strong share "
        f"{held['strong_share']:.1%} (target {meta['target_strong_share']:.1%}), quality {held['quality']:.3f} "
        f"(weak {held['weak_quality']:.3f}, strong {held['strong_quality']:.3f}), ranking AUC {held['ranking_auc']:.3f}"
    )


@route_app.command("eval")
def route_eval(
    weak: Annotated[Path, typer.Option(help="The weak model dir or run dir.")],
    strong: Annotated[Path, typer.Option(help="The strong model dir or run dir.")],
    tasks: RouteTasks,
    router: Annotated[
        Path | None, typer.Option(help="A learned router (slm route train): evaluated on its held-out items.")
    ] = None,
    template: Annotated[str | None, typer.Option(help="Prompt template (default: the router's, else plain).")] = None,
    suite_size: Annotated[int | None, typer.Option(help="Examples per built-in task (default: the router's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for built-in tasks and the bootstrap.")] = 0,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples over items.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    report: Annotated[Path | None, typer.Option(help="Write routing.json and routing.html (plot) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Quality vs share of strong calls for random, cascade, learned and oracle routers: APGR, CPT(50%/80%), AUC."""
    from slmkit.route.train import evaluate_routing

    if resamples < 1:
        raise UserError(f"--resamples must be >= 1, got {resamples}")
    if report is not None:
        from slmkit.interop.outputs import check_output

        check_output(report, "dir", overwrite=True, option="--report")
    err = _console(stderr=True)
    result = evaluate_routing(
        weak, strong, tasks, router, template, suite_size, seed, batch_size, resamples=resamples,
        on_status=lambda m: err.print(f"[dim]{m}[/]"),
    )  # fmt: skip
    if report is not None:
        from slmkit.route.report import write_report

        _, html_path = write_report(result, report)
        err.print(f"wrote {html_path}")
    if as_json:
        print(json.dumps(result))
        return
    from rich.table import Table

    def cell(entry: dict[str, Any]) -> str:
        if entry["value"] is None:
            return "n/a"
        ci = entry["ci95"]
        return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    table = Table(
        title=f"{result['items']} items: weak {result['weak']:.3f}, strong {result['strong']:.3f} (95% bootstrap CIs)"
    )
    for col in ("router", "APGR", "CPT(50%)", "CPT(80%)", "AUC"):
        table.add_column(col, justify="left" if col == "router" else "right")
    for name, r in result["routers"].items():
        table.add_row(name, cell(r["apgr"]), cell(r["cpt50"]), cell(r["cpt80"]), cell(r["auc"]))
    _console().print(table)
    for d in result["apgr_differences"]:
        _console().print(f"APGR {d['router']} - {d['baseline']}: {cell(d)}")


@route_app.command("generate")
def route_generate(
    small: Annotated[Path, typer.Option(help="The small model dir (drafts every token).")],
    large: Annotated[Path, typer.Option(help="The large model dir (same tokenizer): picks the unsure tokens.")],
    prompt: Annotated[list[str], typer.Option(help="Prompt text (repeatable).")],
    threshold: Annotated[
        float, typer.Option(help="Take a token from the large model when the small one's top probability is below.")
    ] = 0.5,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 64,
    compare: Annotated[
        bool, typer.Option("--compare", help="Also run the large model alone: speed ratio and agreement.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Token-level routing (R2R-style): the small model generates greedily, unsure tokens come from the large one."""
    from slmkit.loading import load
    from slmkit.route.token import TokenRouteStats, check_same_tokenizer, compare_with_large, token_route_text

    small_lm, large_lm = load(small), load(large)
    check_same_tokenizer(small_lm, large_lm)
    outputs, all_stats = [], []
    for text in prompt:
        stats = TokenRouteStats()
        outputs.append(token_route_text(small_lm, large_lm, text, max_new_tokens, threshold, stats))
        all_stats.append(stats.to_dict())
    comparison = compare_with_large(small_lm, large_lm, prompt, max_new_tokens, threshold) if compare else None
    if as_json:
        print(json.dumps({"outputs": outputs, "stats": all_stats, "compare": comparison}))
        return
    console = _console()
    for text, out, stats in zip(prompt, outputs, all_stats, strict=True):
        console.print(text + out, markup=False, highlight=False)
        console.print(
            f"[dim]{stats['new_tokens']} tokens, {stats['tokens_from_large']} from the large model; forwards: small "
            f"{stats['small_forwards']}, large {stats['large_forwards']}; {stats['tokens_per_second']:.1f} tokens/s[/]"
        )
    if comparison is not None:
        console.print(
            f"vs the large model alone: {comparison['speedup']:.2f}x tokens/s; routed text repeats "
            f"{comparison['same_as_large_prefix_share']:.1%} of the large model's tokens before the first difference"
        )


@app.command()
def serve(
    model: Annotated[
        Path | None, typer.Argument(help="Model dir or run dir to serve (served under its directory's name).")
    ] = None,
    models: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="NAME=DIR: serve the model in DIR as NAME, instead of MODEL; repeatable (each model has its own "
            "batcher). With two or more, the virtual model --router-name answers: a cascade, first model first.",
        ),
    ] = None,
    router_name: Annotated[
        str, typer.Option(help="The name of the virtual router model (listed with two or more --model).")
    ] = "router",
    cascade_threshold: Annotated[
        float,
        typer.Option(
            help="The router's cascade: an answer whose mean token log-probability is below this goes to the next "
            "--model (the last one is final)."
        ),
    ] = -1.0,
    router: Annotated[
        Path | None,
        typer.Option(
            help="A learned router dir (slm route train) for two --model, weak first: the router model then sends "
            "each prompt to the model the router chooses instead of the cascade."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer KEY' on /v1/ routes. Else --api-key-file, else $SLM_API_KEY."
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="Read the API key from this file (its first line); keeps it off ps.")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together (rows of the KV cache).")] = 32,
    max_queue: Annotated[int, typer.Option(help="Sequences that may wait for a row; more get 503 + Retry-After.")] = 64,
    request_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds from arrival: a running request then ends (finish_reason length), a queued one 503."
        ),
    ] = None,
    prefill_chunk: Annotated[int, typer.Option(help="Prompt tokens prefilled per decode step at most.")] = 512,
    drain_timeout: Annotated[
        float, typer.Option(help="On Ctrl-C/SIGTERM, seconds to let running requests finish.")
    ] = 30,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="Compile the decode step (CUDA graphs on a GPU, C++ kernels on a CPU). Default: on CUDA only.",
        ),
    ] = None,
    speculate: Annotated[
        str,
        typer.Option(
            help="off, lookup (prompt-lookup drafts) or recycle (drafts from the model's past top-k next tokens): "
            "every row's draft verified in one pass; tree: recycle, with a draft tree (4,2,1,1,1,1) verified in one "
            "pass while one request runs alone (greedy, attention models)."
        ),
    ] = "off",
    speculate_k: Annotated[int, typer.Option(help="Drafted tokens per row and step at most (with --speculate).")] = 8,
    max_request_bytes: Annotated[int, typer.Option(help="Larger request bodies get 413.")] = 1 << 20,
    allowed_hosts: Annotated[
        str | None,
        typer.Option(
            help="Host names (comma-separated, any port) the Host header may name; '*': any. Default: "
            "localhost,127.0.0.1,[::1] when --host is a loopback address, else any."
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            help="An origin (https://app.example) whose web pages may call the API; repeatable; '*': any. "
            "Requests with another Origin header get 403."
        ),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            help="NAME=DIR: also serve the PEFT LoRA adapter in DIR as model NAME (a request's 'model' picks it; "
            "requests for different adapters share one batch); repeatable.",
        ),
    ] = None,
    kv_window: KVWindow = None,
    kv_sinks: KVSinks = 0,
    kv_dtype: KVDtype = "auto",
    kv_prune_keys: KVPruneKeys = 0.0,
    prefix_cache: Annotated[
        bool,
        typer.Option(
            "--prefix-cache/--no-prefix-cache",
            help="Reuse the keys and values of prompt prefixes seen before (a shared system prompt, a chat's history).",
        ),
    ] = True,
    prefix_cache_mb: Annotated[
        float, typer.Option(help="Memory for cached prefix blocks, MiB (the least recently used go first).")
    ] = 256,
    kv_memory: KVMemory = None,
    kv_block: KVBlock = None,
    kv_memory_blocks: KVMemoryBlocks = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions), with continuous
    batching; with --lora, LoRA adapters per request beside the base; with several --model, several models and a
    cascade router over them."""
    from slmkit.serve.app import resolve_api_key
    from slmkit.serve.app import serve as run_server

    hosts = None if allowed_hosts is None else [h.strip() for h in allowed_hosts.split(",") if h.strip()]
    run_server(
        model, host=host, port=port, api_key=resolve_api_key(api_key, api_key_file), max_queue=max_queue,
        max_batch=max_batch, request_timeout=request_timeout, prefill_chunk=prefill_chunk,
        drain_timeout=drain_timeout, compile=compile, speculate=speculate, speculate_k=speculate_k,
        max_request_bytes=max_request_bytes, allowed_hosts=hosts, cors_origins=cors_origin or (), lora=lora or (),
        kv_cache=kv_cache_spec(kv_window, kv_sinks, kv_dtype, kv_prune_keys, kv_memory, kv_block, kv_memory_blocks),
        models=models or (), router_name=router_name, cascade_threshold=cascade_threshold, router=router,
        prefix_cache=prefix_cache, prefix_cache_mb=prefix_cache_mb,
    )  # fmt: skip


def kv_cache_spec(
    window: int | None,
    sinks: int,
    dtype: str,
    prune_keys: float,
    memory: int | None = None,
    block: int | None = None,
    memory_blocks: int | None = None,
) -> Any:
    """The KVCacheSpec of the --kv-* options (None when they are all at their defaults); UserError for bad values."""
    from slmkit.models.state import KVCacheSpec

    spec = KVCacheSpec(
        window=window, sinks=sinks, dtype=dtype, prune_keys=prune_keys,  # type: ignore[arg-type]
        topk=memory, block_size=block, memory_blocks=memory_blocks,
    )  # fmt: skip
    return None if spec.is_default else spec


# ---- checks every command shares: numeric options, devices, one-line errors ---------------------------
# Numeric options are >= 0 unless named here: these must be >= 1 (counts, lengths) ...
_AT_LEAST_ONE = frozenset(
    "seq_len batch_size grad_accum max_steps max_tokens eval_interval save_interval max_new_tokens speculate_k "
    "suite_size limit threads levels min_steps val_windows calib_samples calib_seq_len eval_windows group_size "
    "vocab_size max_batch max_queue prefill_chunk kv_window".split()
)
# ... these must be > 0 (rates, budgets, shares) ...
_ABOVE_ZERO = frozenset(
    "lr max_minutes max_flops budget_flops budget_minutes minutes level_ratio inference_tokens max_decode_ms "
    "max_params ci top_p request_timeout target_loss repetition_penalty".split()
)
# ... and these may be negative.
_SIGNED = frozenset({"frequency_penalty", "presence_penalty", "cascade_threshold"})
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def check_device(name: str) -> str:
    """`name` if it names a device this machine has (auto, cpu, cuda, cuda:N, mps); UserError otherwise."""
    import re

    if name in ("auto", "cpu"):
        return name
    if not re.fullmatch(r"cuda(:\d+)?|mps", name):
        raise UserError(f"--device {name!r} is not a device slmkit can use; choose one of: {DEVICES}")
    import torch

    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps: no Apple GPU (MPS) is available here; use --device cpu or auto")
        return name
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 ...)")
    return name


def _check_utf8(flag: str, text: str) -> None:
    """Text from argv that was not UTF-8 arrives with surrogate escapes; it cannot be tokenized or printed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = text.encode("utf-8", "surrogateescape")
        raise UserError(
            f"{flag} is not UTF-8 text (byte {raw[exc.start : exc.start + 1]!r} at offset {exc.start}); "
            "give UTF-8 text, or put it in a UTF-8 file"
        ) from None


def check_option_values(values: dict[str, Any]) -> None:
    """UserError for a numeric option out of its range (see the tables above) or a --device this machine lacks."""
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                _check_utf8(flag, text)
        if name == "device" and isinstance(value, str):
            check_device(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
        if name in _SIGNED:
            continue
        if name in _AT_LEAST_ONE and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value:g}")
        if name in _ABOVE_ZERO and value <= 0:
            raise UserError(f"{flag} must be > 0, got {value:g}")
        if value < 0:
            raise UserError(f"{flag} must be >= 0, got {value:g}")


def _add_checks(command: Any) -> None:
    """Run check_option_values on every command's options before the command itself."""
    import functools

    callback = getattr(command, "callback", None)
    if callback is not None and not getattr(callback, "_options_checked", False):

        @functools.wraps(callback)
        def checked(*args: Any, **kwargs: Any) -> Any:
            check_option_values(kwargs)
            return callback(*args, **kwargs)

        checked._options_checked = True  # type: ignore[attr-defined]
        command.callback = checked
    for sub in getattr(command, "commands", {}).values():
        _add_checks(sub)


def _error_line(message: str) -> str:
    return "error: " + " ".join(str(message).split())


def run(argv: list[str] | None = None) -> int:
    """Run `slm` with `argv` (default: sys.argv[1:]); the exit code. User errors print one `error:` line."""
    from typer.exceptions import TyperException

    command = typer.main.get_command(app)
    _add_checks(command)
    try:
        code = command.main(args=argv, prog_name="slm", standalone_mode=False)
    except UserError as exc:
        print(_error_line(str(exc)), file=sys.stderr)
        from slmkit.train.distributed import RankFailure

        if isinstance(exc, RankFailure):
            # a peer died mid-collective: the backend's threads may still wait on it, and interpreter teardown
            # then aborts the process (SIGABRT seen under load) instead of exiting with the error's code
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.exit_code)
        return exc.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except TyperException as exc:  # click's usage errors: unknown option, missing argument, bad value
        exit_code = getattr(exc, "exit_code", 2)
        if type(exc).__name__ == "NoArgsIsHelpError" or sys.stderr.isatty():
            from typer import rich_utils  # the help, or typer's box with the usage, for a person at a terminal

            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # type: ignore[attr-defined]
            else:
                rich_utils.rich_format_error(exc)  # type: ignore[arg-type]
            return exit_code
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            message += f" (see: {ctx.command_path} --help)"
        print(_error_line(message), file=sys.stderr)
        return exit_code
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
