"""Load on `slm serve`: N concurrent clients stream greedy completions for a fixed time.

    PYTHONPATH=src python benchmarks/serve_load.py MODEL_DIR [--clients 1 8 32 64] [--seconds 10] [--max-tokens 32]

The server is a `python -m slmkit serve` process on 127.0.0.1 (a free port, --max-batch the largest client count);
clients are threads of this process, each sending one streaming request after another (urllib, one connection per
request) and reading the server-sent events as they arrive. Per client count it prints requests/s, aggregate output
tokens/s (and its ratio to the single-client figure: the gain from continuous batching), p50/p99 time to first
token, p50/p99 inter-token latency (gaps between content events) and the error count.

Prefix caching: ``--system-words N`` puts one shared system prompt of N words before every prompt (as a chat
service's instructions do), and ``--compare-prefix-cache`` runs the whole load twice, on a server started with
``--no-prefix-cache`` and on one with ``--prefix-cache``, printing each run's figures, the cache's hit rate and
cached bytes (from /metrics) and the ratio of output tokens/s and TTFT with the cache to without it.
"""

from __future__ import annotations

import argparse
import json
import os
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
SYSTEM_WORDS = (
    "You are a helpful assistant for a small language model toolkit . Answer briefly , cite the page of the docs "
    "you used , never invent a figure , and say so when you do not know ."
).split()


def system_prompt(words: int) -> str:
    """A shared instruction of `words` words (the sentence repeated): every request starts with it."""
    return " ".join(SYSTEM_WORDS[i % len(SYSTEM_WORDS)] for i in range(words)) + "\n\n" if words else ""


def scrape(base_url: str) -> dict[str, float]:
    """The plain (unlabelled) series of /metrics."""
    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
            values[parts[0]] = float(parts[1])
    return values


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
    parser.add_argument("--system-words", type=int, default=0, help="a shared system prompt of this many words")
    parser.add_argument("--compare-prefix-cache", action="store_true", help="run without, then with the cache")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more `slm serve` options")
    args = parser.parse_args()

    print(
        f"hardware: {hardware()}; model {args.model}; streaming, greedy, max_tokens {args.max_tokens}; "
        f"{args.seconds:.0f} s per client count; shared system prompt {args.system_words} words"
    )
    if not args.compare_prefix_cache:
        load(args, args.server_args)
        return
    runs = {}
    for flag in ("--no-prefix-cache", "--prefix-cache"):
        print(f"-- server {flag}")
        runs[flag] = load(args, [flag, *args.server_args])
    for n in args.clients:
        (off_tps, off_ttft), (on_tps, on_ttft) = runs["--no-prefix-cache"][n], runs["--prefix-cache"][n]
        print(
            f"clients {n:3d}: prefix cache on / off: output tokens/s {on_tps / off_tps:5.2f}x, "
            f"TTFT p50 {on_ttft / off_ttft:5.2f}x"
        )


def load(args: argparse.Namespace, server_args: list[str]) -> dict[int, tuple[float, float]]:
    """One server, every client count in turn: {clients: (output tokens/s, TTFT p50)}."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "slmkit", "serve", args.model, "--port", str(port), "--max-queue", "1024",
           "--max-batch", str(max(args.clients)), *server_args]  # fmt: skip
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
    system = system_prompt(args.system_words)
    results: dict[int, tuple[float, float]] = {}
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
                    body = {"model": name, "prompt": system + PROMPTS[(i + k) % len(PROMPTS)],
                            "max_tokens": args.max_tokens, "temperature": 0, "stream": True}  # fmt: skip
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
            metrics = scrape(base_url)
            cache = ""
            if "slm_prefix_cache_hit_rate" in metrics:
                cache = (
                    f", prefix cache hit rate {metrics['slm_prefix_cache_hit_rate']:.1%} "
                    f"({metrics['slm_prefix_cache_bytes'] / 2**20:.1f} MiB cached)"
                )
            results[n] = (tps, percentile(ttft, 0.5))
            print(
                f"clients {n:3d}: {done[0] / wall:6.1f} req/s, {tps:7.1f} output tokens/s "
                f"({tps / base:5.2f}x 1 client), "
                f"TTFT p50 {percentile(ttft, 0.5) * 1e3:6.1f} ms p99 {percentile(ttft, 0.99) * 1e3:6.1f} ms, "
                f"inter-token p50 {percentile(gaps, 0.5) * 1e3:5.1f} ms p99 {percentile(gaps, 0.99) * 1e3:6.1f} ms, "
                f"errors {errors[0]}{cache}; load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(60)
    return results


if __name__ == "__main__":
    main()
