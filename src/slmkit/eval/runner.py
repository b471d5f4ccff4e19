"""`slm eval` for one or many models: text scores, tasks and efficiency gathered into one report dict."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slmkit.errors import UserError

log = logging.getLogger(__name__)

REPORT_VERSION = 1


def slmkit_version() -> str:
    """The installed slmkit's version, read from its metadata: importing the `slmkit` package itself here would
    tie eval to `slmkit.api`, which the package's lazy attributes load."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slmkit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def model_name(directory: Path) -> str:
    """A short readable name: `run/final` or `run/step-100` for run outputs, else the directory name."""
    directory = Path(directory)
    if directory.name == "final" or directory.name.startswith("step-"):
        parent = directory.parent.parent if directory.parent.name == "checkpoints" else directory.parent
        return f"{parent.name}/{directory.name}"
    return directory.name


def static_costs(lm: Any) -> dict[str, Any]:
    """Costs that need no measurement: parameter and FLOP counts, bytes on disk."""
    from slmkit.eval.efficiency import disk_bytes

    config = lm.config
    return {
        **config.param_counts(),
        "train_flops_per_token": config.flops_per_token(),
        "forward_flops_per_token": config.flops_per_token() / 3,
        "flops_seq_len": config.max_seq_len,
        **disk_bytes(lm.directory),
    }


def quality_of(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The one quality number plotted against cost: mean primary task metric, else bits per byte."""
    tasks = entry.get("tasks") or []
    if tasks:
        values = [t["metrics"][t["primary_metric"]]["mean"] for t in tasks]
        names = sorted({t["primary_metric"] for t in tasks})
        return {
            "name": f"mean {'/'.join(names)} over {len(tasks)} task(s)",
            "value": sum(values) / len(values),
            "higher_is_better": True,
        }
    text = entry.get("text")
    if text and text.get("bits_per_byte") is not None:
        return {"name": "bits per byte", "value": text["bits_per_byte"], "higher_is_better": False}
    return None


def _contamination(
    task_list: list[Any], data: str | Path | None, n: int, limit: int | None, status: Callable[[str], None]
) -> dict[int, dict[str, Any]] | None:
    """Per task (keyed by id()), the n-gram overlap of the items that will be scored with `data`'s train split."""
    if data is None:
        return None
    if not task_list:
        raise UserError("--contamination-data needs tasks to check: give --tasks or --suite builtin")
    from slmkit.data.contamination import check_n, contamination

    check_n(n, "--contamination-n")
    status(f"contamination: {n}-gram overlap of the task items with {data}")
    scored = [(task.name, task.examples[:limit] if limit else task.examples) for task in task_list]
    results = contamination(data, scored, n=n)
    return {id(task): {**r.to_dict(), "n": n, "data": str(data)} for task, r in zip(task_list, results, strict=True)}


def run_eval(
    models: Sequence[str | Path],
    data: Sequence[str | Path] | None = None,
    split: str = "val",
    seq_len: int | None = None,
    batch_size: int = 8,
    tasks: Sequence[str] | None = None,
    suite: str | None = None,
    corpus: Sequence[str] | None = None,
    suite_size: int = 100,
    templates: Sequence[str] | None = None,
    num_fewshot: int = 0,
    seed: int = 0,
    limit: int | None = None,
    efficiency: bool = False,
    efficiency_options: dict[str, Any] | None = None,
    isolate_efficiency: bool = True,
    device: str = "cpu",
    on_status: Callable[[str], None] | None = None,
    contamination_data: str | Path | None = None,
    contamination_n: int = 13,
    compare: str | Path | None = None,
    olmes: bool = False,
) -> dict[str, Any]:
    """Evaluate every model on the same text, tasks and efficiency probes; return the report dict.

    With `contamination_data` (a prepared data dir), each task result also carries ``contamination``: how many
    of its scored items share a `contamination_n`-gram with that data's train split
    (:func:`slmkit.data.contamination.contamination`). compare: a base model, evaluated first alongside the others
    (unless it is one of them); each other model's entry gains `compare` (`slmkit.eval.compare.compare_tasks`:
    accuracy delta and answer flips per task). olmes: OLMES-style task scoring (`evaluate_task`)."""
    from slmkit.eval.builtin import builtin_suite, resolve_tasks

    status = on_status or (lambda _msg: None)
    if not models:
        raise UserError("give at least one model directory")
    if not (data or tasks or suite or efficiency):
        raise UserError("nothing to evaluate: give --data (text), --tasks, --suite builtin and/or --efficiency")
    if suite is not None and suite != "builtin":
        raise UserError(f"unknown suite {suite!r}; the only suite is 'builtin'")
    # resolve every input before the first model runs, so a bad task file fails in a second, not an hour
    corpus_list = [str(c) for c in corpus] if corpus else None
    task_list = resolve_tasks([str(t) for t in tasks or []], suite_size, seed, corpus_list)
    if suite == "builtin":
        task_list += builtin_suite(suite_size, seed, corpus_list)
    if compare is not None and not task_list:
        raise UserError("--compare counts answer flips on tasks: give --tasks or --suite builtin too")
    overlap = _contamination(task_list, contamination_data, contamination_n, limit, status)
    # torch comes in only now: bad input above is reported without waiting for it to import
    import torch

    from slmkit.eval.efficiency import device_name, measure_efficiency, measure_in_subprocess
    from slmkit.eval.perplexity import evaluate_text
    from slmkit.eval.tasks import evaluate_task
    from slmkit.loading import load

    loaded = [load(m, device=device) for m in models]
    base_index = None
    if compare is not None:
        base = load(compare, device=device)
        same = [i for i, lm in enumerate(loaded) if Path(lm.directory).resolve() == Path(base.directory).resolve()]
        if same:
            base_index = same[0]
        else:
            loaded.insert(0, base)
            base_index = 0
    names = [model_name(lm.directory) for lm in loaded]
    if len(set(names)) < len(names):
        names = [str(lm.directory) for lm in loaded]
    entries = []
    for lm, name in zip(loaded, names, strict=True):
        entry: dict[str, Any] = {"name": name, "path": str(lm.directory), "costs": static_costs(lm)}
        if data:
            status(f"{name}: text")
            start = time.perf_counter()
            score = evaluate_text(lm, list(data), split=split, seq_len=seq_len, batch_size=batch_size)
            is_data_dir = len(data) == 1 and (Path(data[0]) / "meta.json").is_file()
            entry["text"] = {**score.to_dict(), "data": [str(d) for d in data], "split": split if is_data_dir else None}
            entry["text"]["seconds"] = time.perf_counter() - start
        if task_list:
            entry["tasks"] = []
            for task in task_list:
                status(f"{name}: task {task.name} ({len(task.examples)} examples)")
                result = evaluate_task(lm, task, templates, num_fewshot, seed, batch_size, limit=limit, olmes=olmes)
                if overlap is not None:
                    result["contamination"] = overlap[id(task)]
                entry["tasks"].append(result)
        if efficiency:
            opts = {"device": device, **(efficiency_options or {})}
            if isolate_efficiency:  # a fresh process: peak memory is this model's alone
                status(f"{name}: efficiency (fresh process)")
                entry["efficiency"] = measure_in_subprocess(lm.directory, **opts)
            else:
                status(f"{name}: efficiency")
                entry["efficiency"] = measure_efficiency(lm, **opts)
        entry["quality"] = quality_of(entry)
        entries.append(entry)
    if base_index is not None:
        from slmkit.eval.compare import compare_tasks

        for i, entry in enumerate(entries):
            if i != base_index:
                base_entry = entries[base_index]
                entry["compare"] = {"base": base_entry["name"], "tasks": compare_tasks(base_entry, entry)}
    return {
        "report_version": REPORT_VERSION,
        "slmkit_version": slmkit_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"device": device, "device_name": device_name(device), "threads": torch.get_num_threads()},
        "settings": {
            "num_fewshot": num_fewshot,
            "seed": seed,
            "templates": list(templates) if templates else "all",
            "olmes": olmes,
            "limit": limit,
            "suite": suite,
            "suite_size": suite_size,
            "corpus": corpus_list,
            "contamination_data": str(contamination_data) if contamination_data is not None else None,
            "compare": entries[base_index]["name"] if base_index is not None else None,
        },
        "models": entries,
    }
