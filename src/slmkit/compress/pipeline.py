"""`compress(model, method, out, ...)`: one public function behind `slm compress` and the Python API.

It loads the float model, runs one method, writes a model directory atomically (nothing under `out`
until it is complete) whose `config.json` states the method, and measures before/after.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from slmkit.errors import UserError
from slmkit.models.quantized import INFO_KEY, SPEC_KEY

log = logging.getLogger(__name__)

METHODS = (
    "int8",
    "int4",
    "gptq-int4",
    "awq-int4",
    "prune-magnitude",
    "prune-wanda",
    "prune-2:4",
    "prune-structured",
    "lowrank",
    "moe-carve",
    "vocab-trim",
)
_BEFORE: dict[tuple, Measurement] = {}
NEEDS_DATA = {"gptq-int4", "awq-int4", "prune-wanda", "prune-structured", "moe-carve", "vocab-trim"}


@dataclass
class CompressOptions:
    group_size: int | None = None  # int4 methods; None: 128 where it divides a layer's width, else 64, 32...
    outliers: float = 0.0  # int4 methods: share of weights kept in fp16 (SpQR-style)
    activations: str = "none"  # int8: "dynamic" = W8A8 with per-call activation scales on CPU
    embeddings: str = "int8"  # quantized methods: token embedding / output head as "int8" rows or "int4" groups
    sparsity: float = 0.5  # prune-magnitude / prune-wanda
    heads_keep: float = 1.0  # prune-structured
    ffn_keep: float = 1.0
    drop_layers: int = 0
    energy: float = 0.9  # lowrank
    experts: int = 8  # moe-carve: routed experts per layer
    top_k: int = 2  # moe-carve: routed experts per token
    shared: int = 0  # moe-carve: neurons of the shared expert (0: none)
    calib_samples: int = 128
    calib_seq_len: int = 256
    seed: int = 0


@dataclass
class Measurement:
    size_bytes: int
    parameters: int | None = None
    loss: float | None = None
    perplexity: float | None = None
    bits_per_byte: float | None = None
    peak_memory_mb: float | None = None  # peak resident set of a process that loads the model and decodes
    model_memory_mb: float | None = None  # that peak minus the process's resident set before loading
    weights_memory_mb: float | None = None  # bytes of the loaded model's tensors (packed ones as packed)
    decode_tokens_per_second: float | None = None


@dataclass
class CompressResult:
    method: str
    out: Path
    seconds: float
    before: Measurement
    after: Measurement
    record: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def directory_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name.endswith(".safetensors"))


def _write_dir(tmp: Path, source: Path, config: Any, state: dict[str, torch.Tensor] | None, model: Any | None) -> None:
    """Model files into tmp: weights (HF names), config.json, generation config, tokenizer."""
    from slmkit.interop.checkpoint import write_state_files

    if model is not None:
        state = model.state_dict()
    assert state is not None
    write_state_files(state, config, tmp, tokenizer_dir=source)


def _validate(method: str, source_config: Any, options: CompressOptions, data: Any) -> None:
    if method not in METHODS:
        raise UserError(f"unknown compression method {method!r}; choose one of: {', '.join(METHODS)}")
    if SPEC_KEY in source_config.extra and method == "vocab-trim":
        raise UserError(
            "the model is quantized or factored; trim the vocabulary of the float model first, then quantize the "
            "trimmed model"
        )
    if SPEC_KEY in source_config.extra:
        done = source_config.extra[SPEC_KEY].get("method") if isinstance(source_config.extra[SPEC_KEY], dict) else "?"
        raise UserError(
            f"the model is already compressed ({done}); compressing it again is not supported: "
            "start from the float model"
        )
    quantizing = method in ("int8", "int4", "gptq-int4", "awq-int4")
    if options.activations != "none" and method != "int8":
        raise UserError(f"--activations {options.activations} applies to --method int8 only")
    if options.embeddings != "int8" and not quantizing:
        raise UserError(f"--embeddings {options.embeddings} applies to the quantization methods only")
    if method == "vocab-trim" and data is None:
        raise UserError(
            "vocab-trim keeps the tokens a corpus uses: pass --data DATA_DIR (from `slm data prepare` "
            "with this model's tokenizer)"
        )
    if method in NEEDS_DATA and data is None:
        raise UserError(f"{method} needs calibration data: pass --data DATA_DIR (from `slm data prepare`)")


@torch.no_grad()
def _val_score(model: torch.nn.Module, data: Any, seq_len: int, windows: int | None) -> dict[str, float]:
    from slmkit.train.validation import token_nats

    tokens = data.val
    if len(tokens) < 2:
        return {}
    nats, count = token_nats(model, tokens, seq_len, 8, windows)
    loss = nats / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)),
        "bits_per_byte": loss / math.log(2) / data.bytes_per_token("val"),
    }


_PROBE = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
import safetensors.torch, slmkit.models.transformer, slmkit.models.quantized  # imported before the baseline
from slmkit.interop.checkpoint import load_model
from slmkit.infer.generate import generate_ids
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0
try:  # reset the high-water mark so importing torch does not mask the model's peak
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass
base = status("VmRSS")
model = load_model(sys.argv[1])
prompt = [model.config.bos_token_id or 0] * 4
new_tokens = min(int(sys.argv[3]), model.config.max_seq_len - len(prompt))
list(generate_ids(model, prompt, 4))
start = time.perf_counter()
n = len(list(generate_ids(model, prompt, new_tokens)))
seconds = time.perf_counter() - start
print(json.dumps({"peak": status("VmHWM"), "base": base, "tokens_per_second": n / seconds}))
"""


def probe(directory: Path, new_tokens: int = 64) -> dict[str, float]:
    """Peak resident memory and decode speed of a fresh process that loads `directory` and decodes."""
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    threads = str(torch.get_num_threads())
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(directory), threads, str(new_tokens)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr[-2000:]}")
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "peak_memory_mb": d["peak"],
        "model_memory_mb": d["peak"] - d["base"],
        "decode_tokens_per_second": d["tokens_per_second"],
    }


def _measure(
    directory: Path, model: torch.nn.Module, data: Any, seq_len: int, windows: int | None, measure: bool
) -> Measurement:
    m = Measurement(size_bytes=directory_size(directory))
    m.parameters = sum(t.numel() for t in {id(p): p for p in model.parameters()}.values())
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    m.weights_memory_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    if data is not None:
        for key, value in _val_score(model, data, seq_len, windows).items():
            setattr(m, key, value)
    if measure:
        for key, value in probe(directory).items():
            setattr(m, key, value)
    return m


def compress(
    model: str | Path,
    method: str,
    out: str | Path,
    data: str | Path | None = None,
    options: CompressOptions | None = None,
    measure: bool = True,
    eval_windows: int | None = None,
    overwrite: bool = False,
    eval_seq_len: int | None = None,
) -> CompressResult:
    """Compress the model directory `model` with `method` into `out` (atomically) and measure both.

    `data` (a data dir from `slm data prepare`) supplies calibration windows (train split) and the
    before/after scores (val split; `eval_windows` evenly spaced windows, all when None, of `eval_seq_len`
    tokens, default the calibration length; a shorter window scores worse, so compare scores at one length).
    `measure` also runs a fresh process per model to record peak memory and decode tokens/s. An existing `out`
    directory is replaced only with `overwrite`; a file is never replaced by it.
    """
    from slmkit.compress.calibration import calibration_batches
    from slmkit.interop.checkpoint import atomic_directory, load_model, resolve_model_dir
    from slmkit.interop.hf import load_config
    from slmkit.interop.outputs import check_output

    options = options or CompressOptions()
    source = resolve_model_dir(model)
    config = load_config(source / "config.json")
    _validate(method, config, options, data)
    out = Path(out)
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the input model; choose another directory")
    check_output(out, "dir", overwrite)
    data_dir = None
    if data is not None:
        from slmkit.data.shards import load_data_dir

        data_dir = load_data_dir(data)
    float_model = load_model(source)
    seq_len = min(options.calib_seq_len, config.max_seq_len)
    batches = None
    if data is not None and method not in ("int8", "int4", "lowrank", "prune-magnitude", "vocab-trim"):
        batches = calibration_batches(data, source, options.calib_samples, seq_len, seed=options.seed)
    elif data is not None and method == "int4" and options.outliers > 0:
        batches = calibration_batches(data, source, options.calib_samples, seq_len, seed=options.seed)

    start = time.perf_counter()
    state, out_model, new_config = None, None, config
    trim, after_data = None, data_dir
    record: dict[str, Any] = {"method": method}
    if method in ("int8", "int4", "gptq-int4", "awq-int4"):
        from slmkit.compress.quantize import QuantOptions, quantize_model

        algorithm = {"gptq-int4": "gptq", "awq-int4": "awq"}.get(method, "rtn")
        qopts = QuantOptions(
            bits=8 if method == "int8" else 4,
            group_size=options.group_size,
            algorithm=algorithm,
            outliers=options.outliers,
            activations=options.activations,
            embeddings=options.embeddings,
        )
        if method == "int8" and options.outliers:
            raise UserError("--outliers applies to the int4 methods only")
        state, spec = quantize_model(float_model, qopts, batches)
        if batches is not None:
            spec["calibration"] = {"samples": options.calib_samples, "seq_len": seq_len}
        new_config = config.replace(extra={**config.extra, SPEC_KEY: spec})
        record = spec
    elif method == "lowrank":
        from slmkit.compress.lowrank import factorize_model

        state, spec = factorize_model(float_model, options.energy)
        new_config = config.replace(extra={**config.extra, SPEC_KEY: spec})
        record = spec
    elif method == "moe-carve":
        from slmkit.compress.moe import carve_model

        out_model, carved = carve_model(
            float_model, batches, options.experts, options.top_k, options.shared, seed=options.seed
        )
        record = {
            "method": method,
            "experts": options.experts,
            "top_k": options.top_k,
            "shared": options.shared,
            "calibration": {"samples": options.calib_samples, "seq_len": seq_len},
            "shared_active_rate": carved.active_rate,
        }
        new_config = out_model.config
    elif method == "vocab-trim":
        from slmkit.compress.vocab import trim_vocabulary
        from slmkit.data.tokenizer import load_tokenizer

        trim = trim_vocabulary(float_model, source, data_dir)
        # the val split in the trimmed ids, for the "after" scores (documents with dropped tokens re-encoded)
        after_data = trim.remap_val(data_dir, load_tokenizer(source))
        out_model, record = trim.model, trim.record
        new_config = out_model.config
    elif method == "prune-structured":
        from slmkit.compress.prune import prune_structured

        out_model, record = prune_structured(
            float_model, batches, options.heads_keep, options.ffn_keep, options.drop_layers
        )
        new_config = out_model.config
    else:
        from slmkit.compress.prune import prune_unstructured

        out_model, record = prune_unstructured(float_model, method.removeprefix("prune-"), options.sparsity, batches)
    if out_model is not None:
        history = list(config.extra.get(INFO_KEY, []))
        new_config = new_config.replace(extra={**new_config.extra, INFO_KEY: [*history, record]})
        out_model.config = new_config
    seconds = time.perf_counter() - start

    with atomic_directory(out) as tmp:
        _write_dir(tmp, source, new_config, state, out_model)
        if trim is not None:
            trim.write_files(tmp)
    log.info("wrote %s (%s) in %.1f s", out, method, seconds)

    compressed = load_model(out)
    # the source is measured once per process (a sweep compresses one model many ways)
    score_len = min(eval_seq_len, config.max_seq_len) if eval_seq_len else seq_len
    key = (str(source.resolve()), (source / "model.safetensors").stat().st_mtime_ns, score_len, eval_windows, measure)
    key += (str(data_dir.path) if data_dir is not None else None,)
    if key not in _BEFORE:
        _BEFORE[key] = _measure(source, float_model, data_dir, score_len, eval_windows, measure)
    before = _BEFORE[key]
    after = _measure(out, compressed, after_data, score_len, eval_windows, measure)
    return CompressResult(method=method, out=out, seconds=seconds, before=before, after=after, record=record)
