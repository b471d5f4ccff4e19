"""Load on `slm serve`'s app: N concurrent clients send non-streaming greedy completions for a fixed time.

    PYTHONPATH=src python benchmarks/serve_load.py MODEL_DIR [--clients 1 8 32] [--seconds 10] [--max-tokens 32]

The server is a `python -m slmkit serve` process on 127.0.0.1 (a free port); clients are threads of this process
using urllib (one connection per request). Prints
requests/s, aggregate output tokens/s, p50/p99 request latency and the error count per client count, and the
ratio of tokens/s to the single-client figure (the gain from batching concurrent requests).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import hardware  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "slmkit", "serve", args.model, "--port", str(port), "--max-queue", "1024"]
    server = subprocess.Popen(cmd)
    base_url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            name = json.loads(urllib.request.urlopen(f"{base_url}/v1/models", timeout=1).read())["data"][0]["id"]
            break
        except (urllib.error.URLError, OSError):
            if server.poll() is not None:
                raise SystemExit("the server did not start") from None
            time.sleep(0.1)
    url = f"{base_url}/v1/completions"
    prompts = ["The cat", "Once upon a time", "In the beginning", "A small model", "Hello there", "It was"]
    print(f"hardware: {hardware()}; model {args.model}; max_tokens {args.max_tokens}; {args.seconds:.0f} s per run")
    base = None
    for n in args.clients:
        stop_at = time.perf_counter() + args.seconds
        lat: list[float] = []
        tokens = [0]
        errors = [0]
        lock = threading.Lock()

        def client(i: int, stop_at: float = stop_at, lat: list = lat, tokens: list = tokens, errors: list = errors,
                   lock: threading.Lock = lock) -> None:  # fmt: skip
            k = 0
            while time.perf_counter() < stop_at:
                body = {"model": name, "prompt": prompts[(i + k) % len(prompts)],
                        "max_tokens": args.max_tokens, "temperature": 0}  # fmt: skip
                k += 1
                req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
                t0 = time.perf_counter()
                try:
                    out = json.loads(urllib.request.urlopen(req, timeout=120).read())
                except (urllib.error.URLError, OSError, ValueError):
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    lat.append(time.perf_counter() - t0)
                    tokens[0] += out["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        tps = tokens[0] / wall
        base = base or tps
        p50 = statistics.median(lat) * 1e3 if lat else float("nan")
        p99 = sorted(lat)[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3 if lat else float("nan")
        print(
            f"clients {n:3d}: {len(lat) / wall:7.1f} req/s, {tps:8.1f} output tokens/s ({tps / base:.2f}x 1 client), "
            f"latency p50 {p50:.0f} ms p99 {p99:.0f} ms, errors {errors[0]}"
        )
    server.terminate()
    server.wait(30)


if __name__ == "__main__":
    main()
