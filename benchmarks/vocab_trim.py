"""Vocabulary trimming: what `slm compress --method vocab-trim` saves when a model's tokenizer was trained on a
broad corpus and the model is used on a narrow one.

    python benchmarks/vocab_trim.py --corpus corpus.jsonl --work /tmp/vtb --train-steps 200

1. a byte-level BPE tokenizer of `--vocab` tokens trained on the whole corpus (`slm data prepare`, broad data dir);
2. the narrow corpus: the first `--narrow-docs` documents, tokenized with that tokenizer (narrow data dir, 10% val);
3. slmkit's `--preset` model (random init, or trained `--train-steps` steps on the broad data dir), trimmed to the
   narrow corpus: parameters, file bytes, val bits per byte before/after (printed by the pipeline's measurement),
   and the loss on in-corpus text (the narrow train split) before/after with the probability mass on dropped tokens;
4. a Qwen2-shaped model made by transformers (tied embeddings, random init, `--hf-width` wide, `--hf-layers`
   layers, the tokenizer's vocabulary) trimmed the same way: the case where the vocabulary dominates the size;
   transformers loads the result and its logits over the kept tokens are compared with the original's.

A corpus file is JSON lines with a `text` field, or `title` and `abstract` fields (joined).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import hardware  # noqa: E402


def texts_of(path: Path) -> list[str]:
    out = []
    for line in path.open():
        record = json.loads(line)
        out.append(record["text"] if "text" in record else f"{record['title']}\n\n{record['abstract']}")
    return out


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with path.open("w") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    return path


def report(name: str, result) -> None:
    r, b, a = result.record, result.before, result.after
    print(f"\n## {name}")
    print(f"vocabulary {r['vocab_before']:,} -> {r['vocab_after']:,} tokens ({r['corpus_tokens_used']:,} used by the "
          f"train split's {r['corpus_tokens_counted']:,} tokens; merges {r['merges_before']:,} -> "
          f"{r['merges_after']:,})")  # fmt: skip
    print(f"parameters {b.parameters:,} -> {a.parameters:,} ({100 * (1 - a.parameters / b.parameters):.1f}% fewer)")
    print(f"file bytes {b.size_bytes:,} -> {a.size_bytes:,} ({b.size_bytes / a.size_bytes:.2f}x smaller)")
    print(f"val loss {b.loss:.4f} -> {a.loss:.4f}, bits/byte {b.bits_per_byte:.4f} -> {a.bits_per_byte:.4f}")
    redone = r.get("val_tokens_reencoded")
    print(f"val documents re-encoded (tokens unused by train): {r['val_documents_reencoded']}"
          + (f", {redone['before']} -> {redone['after']} tokens" if redone else ""))  # fmt: skip


@torch.no_grad()
def in_corpus(source: Path, trimmed_dir: Path, data_dir: Path, windows: int = 16, seq_len: int = 256) -> None:
    """Loss on in-corpus text (windows of the narrow train split, which the kept set was counted on) before and
    after, and the probability mass the original puts on the dropped tokens there: the trimmed model's softmax
    is the original's renormalised over the kept tokens, so its loss is lower by -log(kept mass) per token."""
    import numpy as np

    from slmkit.data.shards import load_data_dir
    from slmkit.interop.checkpoint import load_model

    original, trimmed = load_model(source), load_model(trimmed_dir)
    old = json.loads((source / "tokenizer.json").read_text())["model"]["vocab"]
    new = json.loads((trimmed_dir / "tokenizer.json").read_text())["model"]["vocab"]
    kept = torch.tensor([old[t] for t, _ in sorted(new.items(), key=lambda x: x[1])])
    table = torch.full((original.config.vocab_size,), -1)
    table[kept] = torch.arange(len(kept))
    train = torch.from_numpy(np.asarray(load_data_dir(data_dir).train[: windows * seq_len + 1], dtype=np.int64))
    n = (len(train) - 1) // seq_len
    x, y = train[: n * seq_len].view(n, seq_len), train[1 : n * seq_len + 1].view(n, seq_len)
    a = original(x).log_softmax(-1)
    b = trimmed(table[x]).log_softmax(-1)
    before = -a.gather(-1, y[..., None]).mean()
    after = -b.gather(-1, table[y][..., None]).mean()
    dropped = 1 - a[..., kept].exp().sum(-1)
    same = bool((a[..., kept].argmax(-1) == b.argmax(-1)).all())
    argmax_kept = float(torch.isin(a.argmax(-1), kept).float().mean())
    print(f"in-corpus text ({n * seq_len} train tokens): loss {before:.5f} -> {after:.5f}; mass on dropped tokens "
          f"mean {dropped.mean():.2e}, max {dropped.max():.2e}; argmax over kept equal: {same}; original argmax "
          f"is a kept token at {100 * argmax_kept:.2f}% of positions")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--narrow-docs", type=int, default=60)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--hf-width", type=int, default=256)
    parser.add_argument("--hf-layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from slmkit.compress.pipeline import compress
    from slmkit.config import preset
    from slmkit.data.prepare import prepare
    from slmkit.data.shards import load_data_dir
    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model

    print(f"# vocab-trim benchmark on {hardware()}")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    texts = texts_of(args.corpus)
    broad_dir, narrow_dir = work / "broad", work / "narrow"
    if not (broad_dir / "meta.json").is_file():
        prepare([str(write_jsonl(work / "broad.jsonl", texts))], broad_dir, vocab_size=args.vocab, val_fraction=0.05)
    if not (narrow_dir / "meta.json").is_file():
        narrow = write_jsonl(work / "narrow.jsonl", texts[: args.narrow_docs])
        prepare([str(narrow)], narrow_dir, vocab_size=None, tokenizer=broad_dir, val_fraction=0.1)
    vocab = load_data_dir(broad_dir).vocab_size

    # slmkit's own model
    model_dir = work / f"{args.preset}-{args.train_steps}"
    if not (model_dir / "config.json").is_file():
        if args.train_steps:
            from slmkit.train.config import TrainConfig
            from slmkit.train.loop import train

            cfg = TrainConfig(
                preset=args.preset, model={"max_seq_len": 256}, seq_len=256, batch_size=8, max_steps=args.train_steps,
                lr=3e-3, warmup_steps=10, eval_interval=10**6, eval_batches=2, save_interval=10**6, device="cpu",
            )  # fmt: skip
            shutil.copytree(train(cfg, broad_dir, work / "run").final_dir, model_dir)
        else:
            config = preset(args.preset, vocab_size=vocab, max_seq_len=256)
            model = build_model(config)
            model.init_weights(seed=0)
            save_model(model, model_dir, tokenizer_dir=broad_dir)
    result = compress(model_dir, "vocab-trim", work / "trimmed", data=narrow_dir, measure=False, overwrite=True)
    how = f"trained {args.train_steps} steps" if args.train_steps else "random init"
    report(f"slmkit `{args.preset}` ({how})", result)
    in_corpus(model_dir, work / "trimmed", narrow_dir)

    # a model made by transformers, Qwen2-shaped, tied
    import transformers

    hf_dir = work / "qwen2"
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=args.hf_width, intermediate_size=args.hf_width * 11 // 4,
        num_hidden_layers=args.hf_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = transformers.Qwen2ForCausalLM(config).eval()
    hf_model.save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(broad_dir / name, hf_dir / name)
    out = work / "qwen2-trimmed"
    result = compress(hf_dir, "vocab-trim", out, data=narrow_dir, measure=False, overwrite=True)
    report(f"transformers Qwen2ForCausalLM (width {args.hf_width}, {args.hf_layers} layers, tied, random init)",
           result)  # fmt: skip
    old_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    new_tok = transformers.AutoTokenizer.from_pretrained(out)
    old_vocab, new_vocab = old_tok.get_vocab(), new_tok.get_vocab()
    kept = [old_vocab[t] for t, _ in sorted(new_vocab.items(), key=lambda x: x[1])]
    text = texts[0][:600]
    old_ids, new_ids = old_tok(text)["input_ids"], new_tok(text)["input_ids"]
    trimmed = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        a = hf_model(torch.tensor([old_ids[:200]])).logits[..., kept]
        b = trimmed(torch.tensor([new_ids[:200]])).logits
    same = new_tok.convert_ids_to_tokens(new_ids) == old_tok.convert_ids_to_tokens(old_ids)
    print(f"transformers reload: same token strings on an in-corpus text: {same}; "
          f"max |logit difference| over kept tokens {float((a - b).abs().max()):.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
