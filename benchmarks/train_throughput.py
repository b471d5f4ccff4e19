"""Training tokens/s: slmkit's Transformer vs transformers' LlamaForCausalLM, same config/batch/dtype.

    python benchmarks/train_throughput.py [--preset micro] [--batch-size 16] [--seq-len 256] [--steps 10]
    python benchmarks/train_throughput.py --device cuda --bf16 --compile --preset small --batch-size 32   # GPU

Both models get the same weights, the same batches and an AdamW step (with --bf16: autocast, as `slm train`
does on capable GPUs; with --compile: both models through torch.compile); the printed ratio is ours/theirs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import hardware, timed  # noqa: E402
from slmkit.config import preset  # noqa: E402
from slmkit.interop.checkpoint import save_model  # noqa: E402
from slmkit.models import build_model  # noqa: E402


def tokens_per_second(model, loss_fn, batches, steps: int, bf16: bool = False) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device_type = batches[0][0].device.type

    def run(n):
        for i in range(n):
            x, y = batches[i % len(batches)]
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    run(2)  # warm up
    seconds = timed(lambda: run(steps))
    x = batches[0][0]
    return steps * x.numel() / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    cfg = preset(args.preset, vocab_size=args.vocab_size, max_seq_len=max(args.seq_len, 256))
    torch.manual_seed(0)
    ours = build_model(cfg)
    ours.init_weights(0)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")
    ours.train().to(args.device)
    theirs.train().to(args.device)
    if args.compile:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        block = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(args.device)
        batches.append((block[:, :-1], block[:, 1:]))

    def ours_loss(m, x, y):
        logits = m(x)
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    def theirs_loss(m, x, y):
        logits = m(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    rows = []
    for _ in range(args.repeats):  # interleave to share any drift in machine load
        rows.append(
            (
                tokens_per_second(ours, ours_loss, batches, args.steps, args.bf16),
                tokens_per_second(theirs, theirs_loss, batches, args.steps, args.bf16),
            )
        )
    ours_tps = max(r[0] for r in rows)
    theirs_tps = max(r[1] for r in rows)
    print(f"hardware: {hardware()}")
    print(
        f"config: preset {args.preset} ({cfg.num_params():,} params), batch {args.batch_size} x "
        f"seq {args.seq_len}, {'bf16 autocast' if args.bf16 else 'fp32'}{', compiled' if args.compile else ''}, "
        f"{args.device}, AdamW; best of {args.repeats} x {args.steps} steps"
    )
    print(f"slmkit       {ours_tps:10.0f} tokens/s")
    print(f"transformers {theirs_tps:10.0f} tokens/s")
    print(f"ratio (slmkit / transformers): {ours_tps / theirs_tps:.2f}x")


if __name__ == "__main__":
    main()
