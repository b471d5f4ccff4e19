"""Batch-1 decode on a CPU: where a step's time goes, and what the weight layout of `use_decode_layout` changes.

    python benchmarks/decode_layout.py --presets medium,base,124m --threads 1,2 [--compiled medium]

Sections (random weights, each preset's own vocabulary; every figure is a best-of, the variants measured in
alternating rounds so that load on the machine falls on each alike):
- linears: each kind of linear of a decode step (q, k, v, o, MLP gate/up/down, head), x (1, in) times every
  layer's weight in turn (so weights come from memory, as in a step, not from cache), as stored by nn.Linear
  (`F.linear(x, W)`, W (out, in) row-major) and transposed (W's strides swapped: `x @ W.t().contiguous()`):
  milliseconds per step for all layers of that kind (each kind's best round) and GB/s.
  Also q/k/v and gate/up each as one product over their fused transposed matrix (what `use_decode_layout` runs).
- step: the model's decode step (one token after a 16-token prompt, `upto` the current length, as the eager
  core runs it), eager and, for --compiled presets, through torch.compile (inductor, cpp_wrapper, the whole
  static cache as the compiled core runs it), with the stored and the decode layout, at each thread count;
  milliseconds per token and the ratio.
- profile: torch.profiler over decode steps of the eager model with the decode layout, one thread: matrix
  products, attention, the rest (norms, rotary, cache writes, views) and Python/dispatch (the step's wall time
  minus the operators' own time).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import hardware  # noqa: E402
from slmkit.config import preset  # noqa: E402
from slmkit.models import build_model  # noqa: E402
from slmkit.models.decode_layout import use_decode_layout  # noqa: E402

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def load() -> str:
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def random_model(name: str) -> torch.nn.Module:
    cfg = preset(name, eos_token_id=None)
    model = build_model(cfg)
    model.init_weights(0)
    return model.eval()


def section_linears(model: torch.nn.Module, threads: list[int], rounds: int) -> None:
    weights: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in weights and isinstance(module, torch.nn.Linear):
            weights[kind].append(module.weight.detach().contiguous())
    transposed = {k: [w.t().contiguous() for w in ws] for k, ws in weights.items()}
    groups = {"qkv fused": ("q_proj", "k_proj", "v_proj"), "gate+up fused": ("gate_proj", "up_proj")}
    fused = {
        group: [torch.cat([transposed[k][i] for k in parts], dim=1) for i in range(len(weights[parts[0]]))]
        for group, parts in groups.items()
    }

    def one_round(layout: str) -> dict[str, float]:
        spent = dict.fromkeys((*KINDS, *groups), 0.0)
        for i in range(len(weights["q_proj"])):
            if layout == "transposed":  # each group as one product over its fused (in, sum of outs) matrix
                for group in groups:
                    x = torch.randn(1, fused[group][i].shape[0])
                    start = time.perf_counter()
                    x @ fused[group][i]
                    spent[group] += time.perf_counter() - start
            for kind in KINDS:
                if i >= len(weights[kind]):
                    continue
                w, wt = weights[kind][i], transposed[kind][i]
                x = torch.randn(1, w.shape[1])
                start = time.perf_counter()
                if layout == "stored":
                    F.linear(x, w)
                else:
                    x @ wt
                spent[kind] += time.perf_counter() - start
        return spent

    for n in threads:
        torch.set_num_threads(n)
        best: dict[str, dict[str, float]] = {}
        for _ in range(rounds):
            for layout in ("stored", "transposed"):
                spent = one_round(layout)
                mins = best.setdefault(layout, spent)
                best[layout] = {kind: min(mins[kind], spent[kind]) for kind in spent}
        print(f"  linears, {n} thread(s), each kind's best of {rounds} rounds ({load()}):")
        print(f"    {'kind':<10} {'shape (in->out)':>16} {'MB':>7} {'stored ms':>10} {'GB/s':>6} "
              f"{'transposed ms':>14} {'GB/s':>6} {'ratio':>6}")  # fmt: skip
        for kind in KINDS:
            if not weights[kind]:
                continue
            nbytes = sum(w.numel() * 4 for w in weights[kind])
            a, b = best["stored"][kind], best["transposed"][kind]
            shape = f"{weights[kind][0].shape[1]}->{weights[kind][0].shape[0]}"
            print(f"    {kind:<10} {shape:>16} {nbytes / 1e6:7.1f} {a * 1e3:10.2f} {nbytes / a / 1e9:6.1f} "
                  f"{b * 1e3:14.2f} {nbytes / b / 1e9:6.1f} {a / b:5.2f}x")  # fmt: skip
        for group, parts in groups.items():
            nbytes = sum(w.numel() * 4 for w in fused[group])
            a = sum(best["stored"][k] for k in parts)
            b = sum(best["transposed"][k] for k in parts)
            c = best["transposed"][group]
            print(f"    {group:<14} {nbytes / 1e6:7.1f} MB: one product {c * 1e3:.2f} ms ({nbytes / c / 1e9:.1f} "
                  f"GB/s) vs its parts transposed {b * 1e3:.2f} ms ({b / c:.2f}x), stored {a * 1e3:.2f} ms "
                  f"({a / c:.2f}x)")  # fmt: skip
        a = sum(best["stored"][k] for k in KINDS)
        b = sum(best["transposed"][k] for k in KINDS)
        print(f"    all linears: stored {a * 1e3:.2f} ms, transposed {b * 1e3:.2f} ms ({a / b:.2f}x)")


class _Step(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, state: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.state = model, state

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, state=self.state, pos=pos)[:, -1]


def section_step(model: torch.nn.Module, threads: list[int], rounds: int, steps: int, compiled: bool) -> None:
    prompt = 16
    variants: dict[str, object] = {}
    fast = copy.deepcopy(model)
    use_decode_layout(fast)
    token = torch.tensor([[5]])
    max_len = prompt + 2 + rounds * steps * 4 * len(threads) + 8
    for label, m in (("stored", model), ("decode layout", fast)):
        state = m.new_state(1, max_len)
        with torch.no_grad():
            m(torch.randint(1, 300, (1, prompt)), state=state, pos=torch.arange(prompt))
        variants[f"eager, {label}"] = (m, state, None)
        if compiled:
            cstate = m.new_state(1, max_len)
            step = _Step(m, cstate)
            fn = torch.compile(step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
            start = time.perf_counter()
            with torch.no_grad():
                fn(token, torch.tensor([[prompt]]))
            print(f"  compiling the step ({label}) took {time.perf_counter() - start:.1f} s")
            variants[f"compiled, {label}"] = (m, cstate, fn)
    positions = {name: prompt for name in variants}

    def run(name: str) -> float:
        m, state, fn = variants[name]  # type: ignore[misc]
        best = float("inf")
        with torch.no_grad():
            for _ in range(steps):
                p = positions[name]
                start = time.perf_counter()
                if fn is None:
                    m(token, state=state, pos=torch.tensor([p]), upto=p + 1)
                else:
                    fn(token, torch.tensor([[p]]))
                best = min(best, time.perf_counter() - start)
                positions[name] = p + 1
        return best

    results: dict[tuple[str, int], float] = {}
    for _ in range(rounds):
        for n in threads:
            torch.set_num_threads(n)
            for name in variants:
                t = run(name)
                results[(name, n)] = min(results.get((name, n), float("inf")), t)
    print(f"  decode step, ms per token (best of {rounds} x {steps} steps, alternating; {load()}):")
    for name in variants:
        row = "  ".join(f"{n}t {results[(name, n)] * 1e3:7.2f}" for n in threads)
        print(f"    {name:<26} {row}")
    for n in threads:
        a, b = results[("eager, stored", n)], results[("eager, decode layout", n)]
        line = f"    {n} thread(s): eager decode layout {a / b:.2f}x the stored layout"
        if compiled:
            c, d = results[("compiled, stored", n)], results[("compiled, decode layout", n)]
            line += f"; compiled {c / d:.2f}x; compiled decode layout vs eager decode layout {b / d:.2f}x"
        print(line)


def section_profile(model: torch.nn.Module, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    fast = copy.deepcopy(model)
    use_decode_layout(fast)
    torch.set_num_threads(1)
    prompt = 16
    state = fast.new_state(1, prompt + 2 * steps + 2)
    token = torch.tensor([[5]])
    with torch.no_grad():
        fast(torch.randint(1, 300, (1, prompt)), state=state, pos=torch.arange(prompt))
        wall = float("inf")
        for p in range(prompt, prompt + steps):  # warm-up, and the step's wall time without the profiler
            start = time.perf_counter()
            fast(token, state=state, pos=torch.tensor([p]), upto=p + 1)
            wall = min(wall, time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for p in range(prompt + steps, prompt + 2 * steps):
                fast(token, state=state, pos=torch.tensor([p]), upto=p + 1)
    groups = {"matrix products": 0.0, "attention": 0.0, "other operators": 0.0}
    others: list[tuple[float, str, int]] = []
    for event in prof.key_averages():
        name = event.key
        self_us = event.self_cpu_time_total / steps
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::mv"):
            groups["matrix products"] += self_us
        elif "attention" in name:
            groups["attention"] += self_us
        else:
            groups["other operators"] += self_us
            others.append((self_us, name, event.count // steps))
    ops = sum(groups.values())  # microseconds per step
    print(f"  profile, eager, decode layout, 1 thread, {steps} steps ({load()}): best step {wall * 1e3:.2f} ms "
          f"without the profiler; operators' self time per step under it:")  # fmt: skip
    for group, us in groups.items():
        print(f"    {group:<18} {us / 1e3:7.2f} ms  {us / 1e3 / (wall * 1e3):5.1%}")
    top = ", ".join(f"{name.removeprefix('aten::')} {us:.0f} us x{n}" for us, name, n in sorted(others)[::-1][:8])
    print(f"    other operators, largest: {top}")
    print(f"    {'python/dispatch':<18} {wall * 1e3 - ops / 1e3:7.2f} ms  {1 - ops / 1e3 / (wall * 1e3):5.1%} "
          "(best step minus operators' time; can be < 0 "
          "when the profiled steps ran slower)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="medium,base,124m")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--sections", default="linears,step,profile")
    parser.add_argument("--compiled", default="", help="presets whose step is also compiled (slow: a minute each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    threads = [int(n) for n in args.threads.split(",")]
    sections = args.sections.split(",")
    print(f"hardware: {hardware()}; torch {torch.__version__}; {load()}")
    for name in args.presets.split(","):
        model = random_model(name)
        params = sum(p.numel() for p in model.parameters())
        print(f"\n## {name} ({params / 1e6:.1f}M parameters)")
        if "linears" in sections:
            section_linears(model, threads, args.rounds)
        if "step" in sections:
            section_step(model, threads, args.rounds, args.steps, name in args.compiled.split(","))
        if "profile" in sections:
            section_profile(model, args.steps)


if __name__ == "__main__":
    main()
