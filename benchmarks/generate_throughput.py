"""Batch-1 greedy decode tokens/s: slmkit's static-cache decode vs transformers' `generate`, same weights.

    python benchmarks/generate_throughput.py [--preset micro] [--prompt-len 64] [--new-tokens 128]

Both decode greedily from the same prompt with a KV cache; outputs are checked to be identical before the
rate is reported. Printed ratio: ours / theirs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import hardware, timed  # noqa: E402
from slmkit.checkpoint import save_model  # noqa: E402
from slmkit.config import preset  # noqa: E402
from slmkit.infer.generate import generate_ids  # noqa: E402
from slmkit.models.transformer import Transformer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    cfg = preset(args.preset, vocab_size=args.vocab_size)
    ours = Transformer(cfg)
    ours.init_weights(0)
    with torch.no_grad():  # sharper weights than init so greedy paths are not degenerate
        for p in ours.parameters():
            if p.dim() == 2:
                p.mul_(3)
    ours.eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens

    def run_ours() -> list[int]:
        return list(generate_ids(ours, prompt[0].tolist(), max_new_tokens=n))

    def run_theirs() -> list[int]:
        with torch.no_grad():
            out = theirs.generate(
                prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
            )
        return out[0, args.prompt_len :].tolist()

    a, b = run_ours(), run_theirs()
    same = a == b
    ours_rates, theirs_rates = [], []
    for _ in range(args.repeats):
        ours_rates.append(n / timed(run_ours))
        theirs_rates.append(n / timed(run_theirs))
    ours_tps, theirs_tps = max(ours_rates), max(theirs_rates)
    print(f"hardware: {hardware()}")
    print(
        f"config: preset {args.preset} ({cfg.num_params():,} params), batch 1, prompt {args.prompt_len}, "
        f"{n} new tokens, greedy, fp32; best of {args.repeats}; identical outputs: {same}"
    )
    print(f"slmkit       {ours_tps:8.1f} tokens/s (prefill included)")
    print(f"transformers {theirs_tps:8.1f} tokens/s (prefill included)")
    print(f"ratio (slmkit / transformers): {ours_tps / theirs_tps:.2f}x")


if __name__ == "__main__":
    main()
