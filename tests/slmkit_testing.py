"""Helpers shared by test modules in every folder (importable as `slmkit_testing`: pyproject puts tests/ on
pytest's pythonpath). Fixtures live in tests/conftest.py; importing `conftest` by name is ambiguous once
subfolders have their own conftest.py, so plain helpers live here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def run_slm(*args: object, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (`python -m slmkit ...`, the same entry point as `slm`), on this tree's src."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "slmkit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=input,
    )


# prompts for decode-equality tests: short, one token, plain text, and a repetition that lookup speculation matches
PROMPTS = ["The cat sat on the mat", "A", "language models compress text", "one two three one two three one two"]


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference decoder: full forward passes without any state, argmax, n times."""
    import torch

    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt) :]


def greedy_logits(step, prompt, n: int) -> list[int]:
    """Greedy tokens from any logits function (tokens (1, T) -> logits (1, T, V): ours, or a transformers model's
    `lambda t: m(input_ids=t).logits`), full passes without a cache: the reference in parity tests."""
    import torch

    tokens = prompt.clone()
    for _ in range(n):
        tokens = torch.cat((tokens, step(tokens)[:, -1:].argmax(-1)), dim=1)
    return tokens[0, prompt.shape[1] :].tolist()


def run_batcher(batcher, requests: list, join_after: int, steps: int) -> list:
    """Submit requests[:join_after] to a ContinuousBatcher, step it `steps` times, submit the rest (rows joining
    while others decode), run to the end; the sequences, in request order."""
    seqs = [batcher.submit(r) for r in requests[:join_after]]
    for _ in range(steps):
        batcher.step()
    seqs += [batcher.submit(r) for r in requests[join_after:]]
    while batcher.has_work:
        batcher.step()
    return seqs


def tiny_train_config(**changes):
    """A TrainConfig for the `tiny` preset that trains in a few seconds on CPU (eval and saves only at the end)."""
    from slmkit.train.config import TrainConfig

    base = dict(
        preset="tiny",
        model={"max_seq_len": 64},
        seq_len=32,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        eval_interval=1000,
        eval_batches=1,
        save_interval=1000,
        device="cpu",
        seed=7,
    )
    return TrainConfig(**{**base, **changes})


def seeded_logits(model, seed: int = 0):
    """The model's logits on a fixed random batch (2 x 24 tokens): for comparing a model with its variants."""
    import torch

    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(idx)


def rel_err(a, b) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def llama_cpp_eval(path, prompt: list[int]):
    """llama.cpp (libllama from the xllamacpp wheel, tests/llamacpp_peer.py) on the GGUF file at path: the model
    and its logits (T, V) for prompt, with an f32 KV cache."""
    from llamacpp_peer import LlamaCppLogits

    llm = LlamaCppLogits(path)
    return llm, llm.logits(prompt)


def finetune_config(base, data, **changes):
    """A FinetuneConfig of a few fast steps on CPU (eval and saves only at the end unless changed)."""
    from slmkit.train.finetune import FinetuneConfig

    options = dict(
        init=str(base),
        data=str(data),
        seq_len=48,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        max_steps=6,
        eval_interval=1000,
        eval_batches=2,
        save_interval=1000,
        device="cpu",
        seed=3,
    )
    return FinetuneConfig(**{**options, **changes})


def mixed_data_dir(root, corpus_file, vocab_size: int = 512):
    """A data dir of three domains: papers (the shared corpus), code (slmkit's own data modules) and numbers."""
    import json
    from pathlib import Path

    from slmkit.data.prepare import prepare

    root = Path(root)
    code = root / "code"
    code.mkdir(parents=True)
    for path in sorted((SRC / "slmkit" / "data").glob("*.py")):
        (code / path.name).write_text(path.read_text())
    numbers = root / "numbers.jsonl"
    with numbers.open("w") as fh:
        for i in range(300):
            fh.write(json.dumps({"text": " ".join(str(i * k % 97) for k in range(1, 40))}) + "\n")
    out = root / "data"
    prepare([str(code), str(corpus_file), str(numbers)], out, vocab_size=vocab_size, val_fraction=0.1, chunk_chars=2000)
    return out


def word_tokenizer(directory: Path) -> Path:
    """A 300-token BPE tokenizer.json trained on a dozen repeated words (the GGUF tests' vocabulary)."""
    from slmkit.data.tokenizer import train_tokenizer

    words = "model data train token language small scaling loss compute budget attention layer".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(50)) for i in range(40)]
    path = Path(directory) / "tokenizer.json"
    train_tokenizer(texts, 300).save(str(path))
    return path


def perturbed_saved(tmp_path: Path, tokenizer_json: Path, cfg, scale: float):
    """A model of `cfg` (init seed 0, then every weight moved by `scale` x N(0, 1), seed 2, so attention is sharp and
    rope matters; A_log, D, dt bias and norms move too) saved in tmp_path / "m" with `tokenizer_json`."""
    import shutil

    import torch

    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model

    model = build_model(cfg).eval()
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    save_model(model, tmp_path / "m")
    shutil.copy(tokenizer_json, tmp_path / "m" / "tokenizer.json")
    return model
