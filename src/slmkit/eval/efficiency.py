"""What a model costs, measured: parameters, FLOPs, disk, memory, latency and throughput.

Counts are exact (from the config); the rest is measured on this machine, and every result names the
device and thread count it was measured with. Peak memory is sampled in a background thread while
generating; run in a fresh process (``python -m slmkit.eval.efficiency MODEL``, as `slm eval
--efficiency` does) so the figure belongs to one model and not to what the process loaded before.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

_SAMPLE_TEXT = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "Small language models trade quality for speed and memory; measure both before choosing one.\n"
)


class PeakRSS:
    """Highest resident set size of this process seen while the context is open (sampled every 2 ms)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def device_name(device: Any) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def disk_bytes(directory: Path) -> dict[str, int]:
    files = [p for p in Path(directory).iterdir() if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    return {"weights_bytes": weights, "directory_bytes": sum(p.stat().st_size for p in files)}


def _prompt_ids(tokenizer: Any, length: int) -> list[int]:
    ids = tokenizer.encode(_SAMPLE_TEXT).ids or [0]
    return (ids * (length // len(ids) + 1))[:length]


def _time_batch_decode(model: Any, prompt: list[int], batch_size: int, new_tokens: int, kv_cache: Any = None) -> float:
    """Decode tokens/s for `batch_size` greedy sequences decoded together by the decode core (what the engine and
    the server run), prefill excluded."""
    from slmkit.infer.core import decode_greedy

    _, stats = decode_greedy(model, [list(prompt)] * batch_size, new_tokens, kv_cache=kv_cache)
    steps = new_tokens - 1  # the first token of each row comes from prefill
    return batch_size * steps / stats.decode_seconds if stats.decode_seconds > 0 else 0.0


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_efficiency(
    model: str | Path | Any,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    batch_size: int = 8,
    repeats: int = 3,
    device: str = "cpu",
    threads: int | None = None,
    kv_cache: Any = None,
) -> dict[str, Any]:
    """Counts, disk size and measured speed/memory of generating with `model` (path or LoadedModel).

    Timings are the median of `repeats` runs after one warm-up. Peak RSS covers loading and
    generating; `rss_before_load_bytes` is the process before the model was loaded. kv_cache: a `KVCacheSpec` (or
    its fields as a dict) every generation uses; `kv_bytes_per_token` is what one cached position takes in it
    (measured from the state's storage), `kv_state_bytes` the whole state of one sequence of the measured length.
    """
    from slmkit.models.state import KVCacheSpec

    if isinstance(kv_cache, dict):
        kv_cache = KVCacheSpec(**kv_cache)
    import psutil
    import torch

    from slmkit.errors import UserError
    from slmkit.eval.energy import EnergyMeter
    from slmkit.infer.generate import GenerationStats, generate_ids
    from slmkit.loading import LoadedModel, load

    if min(prompt_tokens, new_tokens, batch_size, repeats) < 1:
        raise UserError("efficiency: prompt tokens, new tokens, batch size and repeats must all be >= 1")
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measure_efficiency(model, prompt_tokens, new_tokens, batch_size, repeats, device, kv_cache=kv_cache)
        finally:
            torch.set_num_threads(previous)
    rss_before = psutil.Process().memory_info().rss
    with PeakRSS() as peak:
        lm = model if isinstance(model, LoadedModel) else load(model, device=device)
        config = lm.config
        window = config.max_seq_len
        prompt_len = max(1, min(prompt_tokens, window // 2))
        new = max(2, min(new_tokens, window - prompt_len))
        prompt = _prompt_ids(lm.tokenizer, prompt_len)
        ttft, prefill, decode = [], [], []
        meter = EnergyMeter(str(next(lm.model.parameters()).device))
        for run in range(repeats + 1):
            if run == 1:
                meter.start()  # after the warm-up: the batch-1 runs whose speed is reported
            stats = GenerationStats()
            start = time.perf_counter()
            first = None
            # no stop id: always `new` tokens
            for _ in generate_ids(lm.model, prompt, new, stats=stats, kv_cache=kv_cache):
                if first is None:
                    first = time.perf_counter() - start
            if run == 0:
                continue  # warm-up
            ttft.append(first or 0.0)
            prefill.append(prompt_len / stats.prefill_seconds if stats.prefill_seconds > 0 else 0.0)
            decode.append(stats.decode_tokens_per_second)
        energy = meter.stop()
        batched = [_time_batch_decode(lm.model, prompt, batch_size, new, kv_cache) for _ in range(repeats + 1)][1:]
        state = lm.model.new_state(1, prompt_len + new, **({"cache": kv_cache} if kv_cache is not None else {}))
    param_device = next(lm.model.parameters()).device
    return {
        "model": str(lm.directory),
        **config.param_counts(),
        "train_flops_per_token": config.flops_per_token(),
        "forward_flops_per_token": config.flops_per_token() / 3,
        "flops_seq_len": config.max_seq_len,
        **disk_bytes(lm.directory),
        "peak_rss_bytes": peak.peak,
        "rss_before_load_bytes": rss_before,
        "model_rss_bytes": peak.peak - rss_before,
        "prompt_tokens": prompt_len,
        "new_tokens": new,
        "time_to_first_token_ms": statistics.median(ttft) * 1e3,
        "prefill_tokens_per_second": statistics.median(prefill),
        "decode_tokens_per_second": statistics.median(decode),
        "decode_ms_per_token": 1e3 / statistics.median(decode) if statistics.median(decode) > 0 else None,
        "batch_size": batch_size,
        "batch_decode_tokens_per_second": statistics.median(batched),
        "kv_cache": kv_cache.describe() if kv_cache is not None else KVCacheSpec().describe(),
        "kv_bytes_per_token": state.bytes_per_token(),
        "kv_state_bytes": state.storage_bytes(),
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "device": str(param_device),
        "device_name": device_name(param_device),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "repeats": repeats,
        # joules per generated token over the batch-1 runs (prefill included), or None with the reason
        "energy_joules_per_token": energy.joules / (repeats * new) if energy.joules is not None else None,
        "energy_source": energy.source,
    }


def measure_in_subprocess(model: str | Path, timeout: float = 900, **options: Any) -> dict[str, Any]:
    """`measure_efficiency` in a fresh Python process, so peak memory is this model's alone."""
    import subprocess
    import sys

    from slmkit.errors import UserError

    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, "-m", "slmkit.eval.efficiency", str(model), "--options", json.dumps(options)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode == 2:
        raise UserError(proc.stderr.strip().removeprefix("error: "))
    if proc.returncode != 0:
        raise RuntimeError(f"efficiency measurement of {model} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main() -> None:
    import argparse
    import sys

    from slmkit.errors import UserError

    parser = argparse.ArgumentParser(description="Measure a model's efficiency; print one JSON object.")
    parser.add_argument("model")
    parser.add_argument("--options", default="{}", help="JSON object of measure_efficiency keyword arguments")
    args = parser.parse_args()
    try:
        print(json.dumps(measure_efficiency(args.model, **json.loads(args.options))))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _main()
