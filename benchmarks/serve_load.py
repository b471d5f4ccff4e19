"""Load on `slm serve`: N concurrent clients stream greedy completions for a fixed time.

    PYTHONPATH=src python benchmarks/serve_load.py MODEL_DIR [--clients 1 8 32 64] [--seconds 10] [--max-tokens 32]

The server is a `python -m slmkit serve` process on 127.0.0.1 (a free port, --max-batch the largest client count);
clients are threads of this process, each sending one streaming request after another (urllib, one connection per
request) and reading the server-sent events as they arrive. Per client count it prints requests/s, aggregate output
tokens/s (and its ratio to the single-client figure: the gain from continuous batching), p50/p99 time to first
token, p50/p99 inter-token latency (gaps between content events) and the error count.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import hardware  # noqa: E402

PROMPTS = ["The cat", "Once upon a time", "In the beginning", "A small model", "Hello there", "It was"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stream_once(url: str, body: dict) -> tuple[float, list[float], int]:
    """(time to first token, gaps between later content events, completion tokens) of one streaming request."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    last = start
    gaps: list[float] = []
    tokens = 0
    with urllib.request.urlopen(req, timeout=300) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            now = time.perf_counter()
            if event["choices"][0]["text"]:
                if first is None:
                    first = now - start
                else:
                    gaps.append(now - last)
                last = now
            if "usage" in event:
                tokens = event["usage"]["completion_tokens"]
    if first is None:
        first = time.perf_counter() - start
    return first, gaps, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "slmkit", "serve", args.model, "--port", str(port), "--max-queue", "1024",
           "--max-batch", str(max(args.clients))]  # fmt: skip
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
    print(
        f"hardware: {hardware()}; model {args.model}; streaming, greedy, max_tokens {args.max_tokens}; "
        f"{args.seconds:.0f} s per client count"
    )
    base = None
    try:
        for n in args.clients:
            stop_at = time.perf_counter() + args.seconds
            ttft: list[float] = []
            gaps: list[float] = []
            tokens = [0]
            errors = [0]
            done = [0]
            lock = threading.Lock()

            def client(i: int, stop_at: float = stop_at, ttft: list = ttft, gaps: list = gaps, tokens: list = tokens,
                       errors: list = errors, done: list = done, lock: threading.Lock = lock) -> None:  # fmt: skip
                k = 0
                while time.perf_counter() < stop_at:
                    body = {"model": name, "prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": args.max_tokens,
                            "temperature": 0, "stream": True}  # fmt: skip
                    k += 1
                    try:
                        first, request_gaps, n_tokens = stream_once(url, body)
                    except (urllib.error.URLError, OSError, ValueError, RuntimeError):
                        with lock:
                            errors[0] += 1
                        continue
                    with lock:
                        ttft.append(first)
                        gaps.extend(request_gaps)
                        tokens[0] += n_tokens
                        done[0] += 1

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            tps = tokens[0] / wall
            base = base or tps
            print(
                f"clients {n:3d}: {done[0] / wall:6.1f} req/s, {tps:7.1f} output tokens/s "
                f"({tps / base:5.2f}x 1 client), "
                f"TTFT p50 {percentile(ttft, 0.5) * 1e3:6.1f} ms p99 {percentile(ttft, 0.99) * 1e3:6.1f} ms, "
                f"inter-token p50 {percentile(gaps, 0.5) * 1e3:5.1f} ms p99 {percentile(gaps, 0.99) * 1e3:6.1f} ms, "
                f"errors {errors[0]}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
