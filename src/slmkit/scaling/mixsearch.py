"""`slm data mix-search`: the training mixture that minimises one domain's validation loss, by RegMix.

RegMix (Liu et al. 2024) trains many tiny proxy models, each on a random mixture of the domains, regresses the
target's validation loss on the mixture, and takes the mixture the regression predicts best. Here:

* mixtures are Dirichlet samples centred between the natural mixture (the domains' train tokens) and the uniform
  one, with a concentration drawn per proxy (log-uniform over 0.3..3 times the number of domains) so that some are
  near the centre and some near the simplex's edges; shares under 0.1% are dropped;
* each proxy is an ordinary `slm train --mix` run of one small shape (the ladder's shapes, its cosine schedule and
  learning rate; `--budget-minutes` is split over the proxies from a throughput probe, as the ladder plans
  time), under `OUT/runs/proxy-NN`; the loss of every domain's val range is recorded, on the same evenly spaced
  windows for every proxy, together with the shares the sampler realised;
* a mixing law (`slmkit.scaling.mixlaw`) is fitted on the realised shares and the target's loss, and its best
  mixture is reported with the spread of bootstrap refits, next to the law's prediction for the natural and the
  uniform mixtures.

Files: `mixsearch.json` (the plan: mixtures, steps, data fingerprint), `mixsearch.jsonl` (one line per finished
proxy), `result.json` (the fit and the choice), `mixsearch.png`. Re-running the same command resumes: finished
proxies are skipped, an unfinished one continues from its checkpoint. The target may be left out of `--domains`
(a held-out domain whose loss the training mixture should lower).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.errors import UserError
from slmkit.scaling.ladder import LadderSettings, data_fingerprint, measure_train_throughput, rung_lr
from slmkit.scaling.mixlaw import LAWS, MixtureChoice, check_proxies, choose_mixture
from slmkit.scaling.shapes import Shape, shape_overrides

log = logging.getLogger(__name__)

PLAN_FILE = "mixsearch.json"
RESULTS_FILE = "mixsearch.jsonl"
RESULT_FILE = "result.json"
PLOT_FILE = "mixsearch.png"
MIN_SHARE = 1e-3
TRAIN_SHARE_OF_BUDGET = 0.8  # the rest: evaluation, checkpoints, start-up of each proxy


@dataclass
class MixSearchSettings:
    size: str = "64x2"  # proxy shape, WIDTHxDEPTH
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3  # at width <= 128, as the ladder
    val_windows: int = 64  # per domain, evenly spaced, the same for every proxy
    min_steps: int = 10
    seed: int = 1337
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "val_windows", "min_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"mix-search: {name} must be an integer >= 1, got {value!r}")
        self.shape  # noqa: B018 - validates the size

    @property
    def shape(self) -> Shape:
        width, _, depth = self.size.partition("x")
        if not (width.isdigit() and depth.isdigit()):
            raise UserError(f"mix-search: --size must be WIDTHxDEPTH (e.g. 64x2), got {self.size!r}")
        shape = Shape(int(width), int(depth))
        shape_overrides(shape.width, shape.depth, 8)  # a valid member of the family
        return shape


@dataclass
class MixSearchResult:
    out: Path
    records: list[dict[str, Any]]
    interrupted: bool
    result: dict[str, Any] | None  # result.json's contents once every proxy is done
    choice: MixtureChoice | None = None


def sample_mixtures(natural: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` Dirichlet mixtures centred between `natural` and uniform (see the module docstring)."""
    k = len(natural)
    rng = np.random.default_rng([seed, 7])
    centre = 0.5 * natural + 0.5 / k
    out = []
    for _ in range(count):
        concentration = k * math.exp(rng.uniform(math.log(0.3), math.log(3.0)))
        mixture = rng.dirichlet(centre * concentration)
        mixture[mixture < MIN_SHARE] = 0.0
        if mixture.sum() == 0:  # cannot happen for k >= 1 (the largest share is >= 1/k), kept for safety
            mixture[int(np.argmax(centre))] = 1.0
        out.append(np.round(mixture / mixture.sum(), 6))
    return np.array(out)


def _domains(data: Any, data_dir: str | Path, target: str, names: list[str] | None, seq_len: int) -> list[str]:
    if not data.has_domains:
        raise UserError(
            f"{data_dir} records no domains (prepared before domains existed); re-run `slm data prepare` with one "
            "source per domain"
        )
    known = [d.name for d in data.domains]
    if target not in known:
        raise UserError(f"--target {target!r} is not a domain of {data_dir}; its domains are: {', '.join(known)}")
    if len(data.domain(target).tokens(data, "val")) < seq_len + 1:
        raise UserError(
            f"--target {target!r} has {len(data.domain(target).tokens(data, 'val'))} val tokens, fewer than one window "
            f"of {seq_len + 1}; prepare the data with a larger --val-fraction or use a smaller --seq-len"
        )
    chosen = list(names) if names else known
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise UserError(f"--domains names unknown domain(s) {', '.join(unknown)}; {data_dir} has: {', '.join(known)}")
    if len(set(chosen)) != len(chosen) or len(chosen) < 2:
        raise UserError(f"--domains: give at least two different domains to mix, got {', '.join(chosen)}")
    short = [n for n in chosen if data.domain(n).ranges["train"][1] < seq_len + 1]
    if short:
        raise UserError(
            f"domain(s) {', '.join(short)} of {data_dir} have fewer train tokens than one sequence of {seq_len + 1}; "
            "leave them out with --domains"
        )
    return chosen


def _plan(
    data: Any,
    domains: list[str],
    proxies: int,
    budget_minutes: float | None,
    steps: int | None,
    settings: MixSearchSettings,
) -> dict[str, Any]:
    if (budget_minutes is None) == (steps is None):
        raise UserError("give exactly one proxy budget: --budget-minutes (all proxies together) or --steps (each)")
    tokens_per_step = settings.seq_len * settings.batch_size
    probe = None
    if budget_minutes is not None:
        if not (budget_minutes > 0 and math.isfinite(budget_minutes)):
            raise UserError(f"--budget-minutes must be a positive number, got {budget_minutes}")
        ladder = LadderSettings(seq_len=settings.seq_len, batch_size=settings.batch_size, device=settings.device)
        probe = measure_train_throughput(settings.shape, data.vocab_size, ladder)
        seconds = budget_minutes * 60 * TRAIN_SHARE_OF_BUDGET / proxies
        steps = int(seconds * probe / tokens_per_step)
        if steps < settings.min_steps:
            raise UserError(
                f"--budget-minutes {budget_minutes:g} gives each of {proxies} proxies {steps} steps at {probe:,.0f} "
                f"tokens/s, fewer than {settings.min_steps}; raise the budget, lower --proxies or use a smaller --size"
            )
    assert steps is not None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"--steps must be an integer >= 1, got {steps!r}")
    train_tokens = np.array([data.domain(n).ranges["train"][1] for n in domains], dtype=np.float64)
    natural = train_tokens / train_tokens.sum()
    mixtures = sample_mixtures(natural, proxies, settings.seed)
    return {
        "domains": domains,
        "natural": dict(zip(domains, natural.tolist(), strict=True)),
        "steps": steps,
        "tokens_per_proxy": steps * tokens_per_step,
        "probe_tokens_per_second": probe,
        "proxies": [
            {"name": f"proxy-{i:02d}", "mix": {n: float(s) for n, s in zip(domains, m, strict=True) if s > 0}}
            for i, m in enumerate(mixtures)
        ],
    }


def run_mix_search(
    data_dir: str | Path,
    out: str | Path,
    target: str,
    proxies: int = 32,
    budget_minutes: float | None = None,
    steps: int | None = None,
    domains: list[str] | None = None,
    law: str = "auto",
    bootstrap: int = 100,
    settings: MixSearchSettings | None = None,
    progress: Any = None,
) -> MixSearchResult:
    """Plan (or reload) a mixture search in `out`, train its unfinished proxies, fit the law and choose.

    `progress(done, total, record)` is called after each proxy when given.
    """
    from slmkit.data.shards import load_data_dir

    settings = settings or MixSearchSettings()
    if isinstance(proxies, bool) or not isinstance(proxies, int) or proxies < 2:
        raise UserError(f"--proxies must be an integer >= 2, got {proxies!r}")
    if law not in LAWS:
        raise UserError(f"--law must be one of {', '.join(LAWS)}, got {law!r}")
    out = Path(out)
    data = load_data_dir(data_dir)
    chosen = _domains(data, data_dir, target, domains, settings.seq_len)
    check_proxies(law, len(chosen), proxies)  # before any training
    request = {
        "target": target,
        "proxies": proxies,
        "budget_minutes": budget_minutes,
        "steps": steps,
        "domains": chosen,
        "settings": asdict(settings),
    }
    fingerprint = data_fingerprint(data.meta)
    plan_path = out / PLAN_FILE
    if plan_path.is_file():
        try:
            plan = json.loads(plan_path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{plan_path}: cannot read the plan ({exc}); use a new --out") from None
        if plan.get("data_fingerprint") != fingerprint or plan.get("request") != request:
            raise UserError(
                f"{out} holds a mixture search of other data or options; repeat its options to resume it "
                "(see its mixsearch.json), or use a new --out"
            )
    else:
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not a mixture search (no {PLAN_FILE}); choose a new --out")
        plan = {
            "request": request,
            "data_dir": str(data.path),
            "data_fingerprint": fingerprint,
            **_plan(data, chosen, proxies, budget_minutes, steps, settings),
        }
        out.mkdir(parents=True, exist_ok=True)
        _write_json(plan_path, plan)
    done = _read_records(out / RESULTS_FILE)
    for proxy in plan["proxies"]:
        if proxy["name"] in done:
            continue
        record = _train_proxy(data, out, proxy, plan, settings)
        if record is None:
            return MixSearchResult(out, [done[n] for n in done], True, None)
        done[proxy["name"]] = record
        with (out / RESULTS_FILE).open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if progress is not None:
            progress(len(done), len(plan["proxies"]), record)
    records = [done[p["name"]] for p in plan["proxies"]]
    result, choice = _choose(records, plan, target, law, bootstrap, settings.seed)
    _write_json(out / RESULT_FILE, result)
    draw_plot(records, plan, result, choice, out / PLOT_FILE)
    return MixSearchResult(out, records, False, result, choice)


def _train_proxy(
    data: Any, out: Path, proxy: dict[str, Any], plan: dict[str, Any], settings: MixSearchSettings
) -> dict[str, Any] | None:
    """Train one proxy (resuming it if it has a checkpoint); its record, or None when interrupted."""
    from slmkit.interop.checkpoint import latest_checkpoint
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    shape, steps = settings.shape, plan["steps"]
    run_dir = out / "runs" / proxy["name"]
    cfg = TrainConfig(
        preset="tiny",
        model=shape_overrides(shape.width, shape.depth, settings.seq_len),
        batch_size=settings.batch_size,
        seq_len=settings.seq_len,
        lr=rung_lr(settings.lr, shape.width),
        warmup_steps=max(1, min(100, steps // 10)),
        schedule="cosine",
        max_steps=steps,
        eval_interval=10**9,  # once, at the end: every domain's val loss on val_windows windows
        eval_batches=math.ceil(settings.val_windows / settings.batch_size),
        save_interval=max(10, steps // 2),
        keep_checkpoints=1,
        seed=settings.seed,
        device=settings.device,
        threads=settings.threads,
        mix=proxy["mix"],
    )
    final_state = run_dir / "final" / "trainer_state.json"
    if final_state.is_file():  # trained in an earlier session, stopped before its record was written
        state = json.loads(final_state.read_text())
        val, seconds = state.get("val") or {}, state["elapsed"]
    else:
        resume = latest_checkpoint(run_dir) is not None
        result = train(cfg, data.path, run_dir, resume=resume, reporter=_QuietReporter(), overwrite=not resume)
        if result.stop_reason == "interrupted":
            return None
        val, seconds = result.val, result.seconds
    realised = _realised_shares(run_dir / "metrics.jsonl", plan["domains"])
    return {
        "name": proxy["name"],
        "mix": proxy["mix"],
        "realised": realised,
        "val_loss": {k.removeprefix("val_loss/"): v for k, v in val.items() if k.startswith("val_loss/")},
        "val_bits_per_byte": {
            k.removeprefix("val_bits_per_byte/"): v for k, v in val.items() if k.startswith("val_bits_per_byte/")
        },
        "steps": steps,
        "seconds": seconds,
    }


def _realised_shares(metrics: Path, domains: list[str]) -> dict[str, float]:
    last: dict[str, Any] = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            last = record
    return {n: float(last.get(f"share/{n}", 0.0)) for n in domains}


def _choose(
    records: list[dict[str, Any]], plan: dict[str, Any], target: str, law: str, bootstrap: int, seed: int
) -> tuple[dict[str, Any], MixtureChoice]:
    domains = plan["domains"]
    mixtures = np.array([[r["realised"][n] for n in domains] for r in records])
    losses = np.array([r["val_loss"][target] for r in records])
    choice = choose_mixture(mixtures, losses, law, bootstrap=bootstrap, seed=seed)
    natural = np.array([plan["natural"][n] for n in domains])
    uniform = np.full(len(domains), 1 / len(domains))
    best = {n: round(float(s), 4) for n, s in zip(domains, choice.mixture, strict=True)}
    result = {
        "target": target,
        "domains": domains,
        "proxies": len(records),
        "steps_per_proxy": plan["steps"],
        "fit": choice.law.summary(),
        "best": {
            "mix": {n: s for n, s in best.items() if s > 0},
            "predicted_val_loss": choice.predicted_loss,
            # None without bootstrap refits
            "predicted_val_loss_90": [_number(v) for v in choice.loss_interval],
            "share_std": {n: _number(v) for n, v in zip(domains, choice.share_std.tolist(), strict=True)},
            "bootstrap_refits": len(choice.bootstrap_mixtures),
        },
        "natural": {"mix": plan["natural"], "predicted_val_loss": choice.predict(natural)},
        "uniform": {
            "mix": dict(zip(domains, uniform.tolist(), strict=True)),
            "predicted_val_loss": choice.predict(uniform),
        },
        "best_proxy": min(records, key=lambda r: r["val_loss"][target])["name"],
        "observed_val_loss": {"min": float(losses.min()), "max": float(losses.max())},
    }
    return result, choice


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def write_config(result: dict[str, Any], path: str | Path) -> Path:
    """A training config (YAML, for `slm train --config`) holding the chosen mixture."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--write-config {path} is a directory; give a file name such as mix.yaml")
    best = result["best"]
    low, high = best["predicted_val_loss_90"]
    spread = f", 90% bootstrap {low:.4f}..{high:.4f}" if low is not None else ""
    lines = [
        f"# slm data mix-search: the mixture predicted best for the val loss of domain {result['target']}",
        f"# ({result['fit']['law']} law over {result['proxies']} proxies; predicted val loss "
        f"{best['predicted_val_loss']:.4f}{spread})",
        "mix:",
        *(f"  {name}: {share}" for name, share in best["mix"].items()),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def draw_plot(
    records: list[dict[str, Any]], plan: dict[str, Any], result: dict[str, Any], choice: MixtureChoice, path: Path
) -> Path:
    """Observed vs predicted target loss of the proxies, and the chosen mixture (bootstrap spread) next to the
    natural and uniform ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, target = plan["domains"], result["target"]
    mixtures = np.array([[r["realised"][n] for n in domains] for r in records])
    observed = np.array([r["val_loss"][target] for r in records])
    predicted = choice.law.predict(mixtures)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    left.scatter(predicted, observed, zorder=3)
    low, high = float(min(observed.min(), predicted.min())), float(max(observed.max(), predicted.max()))
    left.plot([low, high], [low, high], "k--", lw=0.8)
    left.set(
        xlabel=f"predicted ({choice.law.kind} law)",
        ylabel=f"observed val loss of {target}",
        title=f"{len(records)} proxies (LOO RMSE {choice.law.loo_rmse or float('nan'):.4f})",
    )
    x = np.arange(len(domains))
    width = 0.27
    natural = [plan["natural"][n] for n in domains]
    right.bar(x - width, natural, width, label=f"natural ({result['natural']['predicted_val_loss']:.3f})")
    right.bar(
        x, [1 / len(domains)] * len(domains), width, label=f"uniform ({result['uniform']['predicted_val_loss']:.3f})"
    )
    right.bar(
        x + width,
        choice.mixture,
        width,
        yerr=None if not np.all(np.isfinite(choice.share_std)) else choice.share_std,
        capsize=3,
        label=f"chosen ({result['best']['predicted_val_loss']:.3f})",
    )
    right.set_xticks(x, domains)
    right.set(ylabel="share of training tokens", title=f"mixtures (predicted val loss of {target})")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _read_records(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that proxy is evaluated again
            if isinstance(record, dict) and "name" in record:
                done[record["name"]] = record
    return done


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


class _QuietReporter:
    def start(self, info: dict[str, Any]) -> None: ...
    def step(self, metrics: dict[str, Any]) -> None: ...
    def eval(self, metrics: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def end(self, result: Any) -> None: ...


__all__ = ["MixSearchResult", "MixSearchSettings", "run_mix_search", "sample_mixtures", "write_config"]
