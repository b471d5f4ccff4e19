"""Vocabulary trimming (`slm compress --method vocab-trim`): a model whose tokenizer was trained on a broad corpus
(2048 tokens) trimmed to what a narrow corpus uses. Checked: the trimmed tokenizer encodes in-corpus text into the
same token strings, the logits over the kept tokens equal the original's, greedy decoding equals the original's
restricted to the kept tokens, the val score is the original's renormalised over the kept tokens, configs and
ids are renumbered, transformers loads the result (Llama untied, Qwen2 tied), GGUF export works, and the
refusals."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import numpy as np
import pytest
import torch

from slmkit.compress.pipeline import compress
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model

WORDS = "model data train token language small scaling loss compute budget attention layer".split()


@pytest.fixture(scope="module")
def broad_tokenizer(tmp_path_factory):
    """2048 tokens trained on a broad corpus: the narrow one's words among 2000 made-up ones."""
    from slmkit.data.tokenizer import save_tokenizer, train_tokenizer

    rng = random.Random(1)
    lexicon = WORDS + [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(2000)
    ]
    texts = [" ".join(rng.choice(lexicon) for _ in range(200)) + "." for _ in range(300)]
    directory = tmp_path_factory.mktemp("broad") / "tok"
    save_tokenizer(train_tokenizer(texts, 2048), directory)
    return directory


@pytest.fixture(scope="module")
def narrow_data(tmp_path_factory, broad_tokenizer):
    """A corpus of 12 words, tokenized with the 2048-token tokenizer: it uses a few dozen of its tokens."""
    from slmkit.data.prepare import prepare

    root = tmp_path_factory.mktemp("narrow")
    rng = random.Random(0)
    with (root / "narrow.jsonl").open("w") as fh:
        for _ in range(60):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(60)) + "."}) + "\n")
    prepare([str(root / "narrow.jsonl")], root / "data", vocab_size=None, tokenizer=broad_tokenizer, val_fraction=0.2)
    return root / "data"


def trim(source, out, data, **kwargs):
    return compress(source, "vocab-trim", out, data=data, measure=False, **kwargs)


def kept_ids(source, out) -> list[int]:
    """Old id of each new id, read off the two tokenizer files (token string -> id)."""
    old = json.loads((source / "tokenizer.json").read_text())["model"]["vocab"]
    new = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    return [old[t] for t, _ in sorted(new.items(), key=lambda x: x[1])]


def in_corpus_text(data) -> str:
    from slmkit.data.shards import load_data_dir
    from slmkit.data.tokenizer import load_tokenizer

    d = load_data_dir(data)
    return load_tokenizer(data).decode(np.asarray(d.train[:200]).tolist())


SWITCHES = {
    "llama-tied": dict(),
    "llama-untied": dict(tie_embeddings=False),
    "llama-padded": dict(vocab_size=2112),  # embedding rows past the tokenizer (as Qwen2's): dropped
    "gpt2": dict(
        family="gpt2",
        n_kv_heads=4,
        norm="layernorm",
        mlp="plain",
        positions="learned",
        activation="gelu_tanh",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
    ),
    "mamba2": dict(family="mamba2", mixer="mamba2", mlp="none", ssm_head_dim=16, ssm_state_size=16),
    "slmkit": dict(family="slmkit", layer_pattern=("gla", "attention"), linear_gate_rank=16),
    "mamba": dict(family="mamba", mixer="mamba", mlp="none", ssm_state_size=16),
    "mixtral": dict(family="mixtral", mlp="moe", moe_experts=4, moe_top_k=2),
    "bamba": dict(
        family="bamba", layer_pattern=("mamba2", "attention"), rope_fraction=0.5, ssm_head_dim=16, ssm_state_size=16
    ),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_trimmed_model_has_the_same_logits_and_greedy_tokens(name, narrow_data, tmp_path, make_model):
    from tokenizers import Tokenizer

    source = make_model(tmp_path / "float", narrow_data, **SWITCHES[name])
    out = tmp_path / "trim"
    result = trim(source, out, narrow_data)
    record = result.record
    vocab = SWITCHES[name].get("vocab_size", 2048)
    assert record["vocab_before"] == vocab and 256 < record["vocab_after"] < 512  # bytes + the corpus's merges
    assert result.after.parameters < result.before.parameters and result.after.size_bytes < result.before.size_bytes
    rows = 1 if SWITCHES[name].get("tie_embeddings", True) else 2
    assert result.before.parameters - result.after.parameters == rows * 64 * (vocab - record["vocab_after"])
    assert record["documents_verified"] > 0

    # the same token strings for in-corpus text, under new ids
    text = in_corpus_text(narrow_data)
    old_tok, new_tok = (
        Tokenizer.from_file(str(source / "tokenizer.json")),
        Tokenizer.from_file(str(out / "tokenizer.json")),
    )
    before, after = old_tok.encode(text), new_tok.encode(text)
    assert after.tokens == before.tokens and after.ids != before.ids
    kept = kept_ids(source, out)
    assert [kept[i] for i in after.ids] == before.ids

    original, trimmed = load_model(source), load_model(out)
    assert trimmed.config.vocab_size == len(kept) == record["vocab_after"]
    with torch.no_grad():
        a = original(torch.tensor([before.ids[:48]]))[..., kept]  # within max_seq_len (learned positions)
        b = trimmed(torch.tensor([after.ids[:48]]))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

    # greedy: the trimmed model picks what the original picks among the kept tokens
    prompt_old, prompt_new = before.ids[:8], after.ids[:8]
    keep = torch.tensor(kept)
    tokens = list(prompt_old)
    with torch.no_grad():
        for _ in range(12):
            tokens.append(int(keep[original(torch.tensor([tokens]))[0, -1, keep].argmax()]))
    from slmkit.infer.generate import generate_ids

    got = list(generate_ids(trimmed, prompt_new, 12))
    assert [kept[i] for i in got] == tokens[8:]


def test_val_score_is_the_original_renormalised_over_the_kept_tokens(narrow_data, tmp_path, make_model):
    """On in-corpus val text the trimmed model's loss is the original's with the softmax taken over the kept tokens
    only: lower by the probability mass the original puts on dropped tokens, never higher."""
    from slmkit.data.shards import load_data_dir
    from slmkit.train.validation import token_nats

    source = make_model(tmp_path / "float", narrow_data)
    result = trim(source, tmp_path / "trim", narrow_data)
    assert result.record["val_documents_reencoded"] == 0  # every val token is used by train here
    kept = torch.tensor(kept_ids(source, tmp_path / "trim"))
    original = load_model(source)

    class Restricted(torch.nn.Module):  # the original model seen through the new ids
        def __init__(self):
            super().__init__()
            self.inner = original

        def forward(self, idx):
            return self.inner(kept[idx])[..., kept]

    data = load_data_dir(narrow_data)
    table = np.full(2048, -1)
    table[kept.numpy()] = np.arange(len(kept))
    nats, count = token_nats(Restricted(), table[np.asarray(data.val)], min(256, original.config.max_seq_len))
    assert result.after.loss == pytest.approx(nats / count, rel=1e-5)
    assert result.after.loss < result.before.loss
    assert result.after.bits_per_byte / result.before.bits_per_byte == pytest.approx(
        result.after.loss / result.before.loss, rel=1e-9
    )


def test_val_documents_with_dropped_tokens_are_reencoded(narrow_data, tmp_path, make_model):
    """Count the corpus over a short start of the train split only: val documents then use dropped tokens and are
    scored in the trimmed tokenizer's encoding of the same text."""
    from slmkit.compress.vocab import trim_vocabulary
    from slmkit.data.shards import load_data_dir
    from slmkit.data.tokenizer import load_tokenizer

    source = make_model(tmp_path / "float", narrow_data)
    data = load_data_dir(narrow_data)
    short = dataclasses.replace(data, train=np.asarray(data.train[:40]))
    result = trim_vocabulary(load_model(source), source, short)
    val = result.remap_val(data, load_tokenizer(source))
    assert result.record["val_documents_reencoded"] > 0
    assert val.val.max() < len(result.kept) and val.val.min() >= 0
    from tokenizers import Tokenizer

    new_tok = Tokenizer.from_str(json.dumps(result.tokenizer_json))
    old_text = load_tokenizer(source).decode(np.asarray(data.val).tolist(), skip_special_tokens=False)
    assert new_tok.decode(val.val.tolist(), skip_special_tokens=False) == old_text
    assert val.bytes_per_token() == data.meta["splits"]["val"]["bytes"] / len(val.val)


def test_config_ids_are_renumbered(narrow_data, tmp_path, make_model):
    """Ids in generation_config.json (eos as a list, pad) are kept whatever the corpus and follow their tokens to
    the new ids, its other keys survive, and the added tokens' ids in tokenizer.json match the vocabulary."""
    source = make_model(tmp_path / "float", narrow_data)
    generation = json.loads((source / "generation_config.json").read_text())
    generation.update(eos_token_id=[0, 1000], pad_token_id=1500, temperature=0.7)
    (source / "generation_config.json").write_text(json.dumps(generation))
    out = tmp_path / "trim"
    trim(source, out, narrow_data)
    kept = kept_ids(source, out)
    new = {old: i for i, old in enumerate(kept)}
    assert 1000 in new and 1500 in new  # far above what the corpus uses (bytes and a few dozen merges)
    written = json.loads((out / "generation_config.json").read_text())
    assert written["eos_token_id"] == [0, new[1000]] and written["pad_token_id"] == new[1500]
    assert written["temperature"] == 0.7 and written["bos_token_id"] == 0
    assert load_model(out).config.vocab_size == len(kept)
    vocab = json.loads((out / "tokenizer.json").read_text())
    assert all(entry["id"] == vocab["model"]["vocab"][entry["content"]] for entry in vocab["added_tokens"])


def test_refusals(narrow_data, data_dir, tmp_path, make_model):
    source = make_model(tmp_path / "float", narrow_data)
    with pytest.raises(UserError, match="pass --data"):
        compress(source, "vocab-trim", tmp_path / "a", measure=False)
    with pytest.raises(UserError, match="different tokenizer"):
        trim(source, tmp_path / "b", data_dir)
    compress(source, "int8", tmp_path / "q", measure=False)
    with pytest.raises(UserError, match="trim the vocabulary of the float model first"):
        trim(tmp_path / "q", tmp_path / "c", narrow_data)
    # the fixture corpus's own 512-token tokenizer: that corpus uses (or builds from) every token
    whole = make_model(tmp_path / "whole", data_dir)
    with pytest.raises(UserError, match="nothing to trim"):
        trim(whole, tmp_path / "d", data_dir)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_gguf_export_of_a_trimmed_model(narrow_data, tmp_path, make_model):
    import gguf

    from slmkit.interop.gguf import export_gguf

    source = make_model(tmp_path / "float", narrow_data, tie_embeddings=False)
    out = tmp_path / "trim"
    result = trim(source, out, narrow_data)
    path = export_gguf(out, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == result.record["vocab_after"]
    new_vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert tokens == [t for t, _ in sorted(new_vocab.items(), key=lambda x: x[1])]
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    assert shapes["token_embd.weight"] == (64, result.record["vocab_after"])
    assert shapes["output.weight"] == (64, result.record["vocab_after"])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_transformers_model_trimmed(family, narrow_data, broad_tokenizer, tmp_path):
    """A model made by transformers (Llama: untied head; Qwen2: tied), its vocabulary (2048) far larger than the
    corpus uses: the trimmed directory loads in transformers, its logits over the kept tokens are the original's,
    AutoTokenizer encodes in-corpus text into the same strings, and the embedding rows are where the bytes go."""
    import transformers

    kwargs = dict(
        vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    if family == "llama":
        config, cls = transformers.LlamaConfig(**kwargs, tie_word_embeddings=False), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.Qwen2Config(**kwargs, tie_word_embeddings=True), transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    source = tmp_path / "hf"
    model.save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(broad_tokenizer / name, source / name)
    out = tmp_path / "trim"
    result = trim(source, out, narrow_data)
    assert result.after.size_bytes < result.before.size_bytes / 2  # the vocabulary is most of this model

    kept = kept_ids(source, out)
    text = in_corpus_text(narrow_data)
    old_tok = transformers.AutoTokenizer.from_pretrained(source)
    new_tok = transformers.AutoTokenizer.from_pretrained(out)
    old_ids, new_ids = old_tok(text)["input_ids"], new_tok(text)["input_ids"]
    assert new_tok.convert_ids_to_tokens(new_ids) == old_tok.convert_ids_to_tokens(old_ids)
    trimmed = cls.from_pretrained(out).eval()
    assert trimmed.config.vocab_size == len(kept)
    assert trimmed.config.tie_word_embeddings == (family == "qwen2")
    with torch.no_grad():
        a = model(torch.tensor([old_ids[:48]])).logits[..., kept]
        b = trimmed(torch.tensor([new_ids[:48]])).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_cli(narrow_data, tmp_path, make_model, capsys, monkeypatch):
    """`slm compress --method vocab-trim` prints the vocabulary and parameter counts; without --data it is one
    error line and exit code 2."""
    from slmkit.cli import main

    source = make_model(tmp_path / "float", narrow_data)

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.argv", ["slm", "compress", str(source), "--method", "vocab-trim", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, text, err = run("--out", tmp_path / "trim", "--data", narrow_data, "--no-measure")
    assert code == 0, err
    assert "vocabulary 2,048 -> " in " ".join(text.split()) and "parameters " in text
    code, text, err = run("--out", tmp_path / "none", "--no-measure")
    assert code == 2 and "pass --data" in err and "Traceback" not in err and not (tmp_path / "none").exists()


def test_llama3_style_tokenizer_file(broad_tokenizer, narrow_data):
    """A tokenizer.json as Llama 3's is written: merges as "a b" strings, ignore_merges, and a TemplateProcessing
    post-processor that adds a begin-of-text token by id. The trimmed file keeps that form, renumbers the
    template's id, and encodes in-corpus text (with the added token) into the same strings."""
    from tokenizers import Tokenizer

    from slmkit.compress.vocab import plan_tokenizer
    from slmkit.data.shards import load_data_dir

    spec = json.loads((broad_tokenizer / "tokenizer.json").read_text())
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    spec["model"]["ignore_merges"] = True
    bos = "<|begin_of_text|>"
    bos_id = len(spec["model"]["vocab"])
    spec["added_tokens"].append(
        dict(id=bos_id, content=bos, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    )
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    used = set(np.unique(np.asarray(load_data_dir(narrow_data).train)).tolist())
    kept, new, _ = plan_tokenizer(spec, used, broad_tokenizer / "tokenizer.json")
    assert isinstance(new["model"]["merges"][0], str) and new["model"]["ignore_merges"] is True
    assert new["post_processor"]["special_tokens"][bos]["ids"] == [len(kept) - 1]  # the last kept id
    old_tok, new_tok = Tokenizer.from_str(json.dumps(spec)), Tokenizer.from_str(json.dumps(new))
    text = in_corpus_text(narrow_data)
    before, after = old_tok.encode(text), new_tok.encode(text)
    assert before.tokens[0] == bos and after.tokens == before.tokens
    assert after.ids[0] == len(kept) - 1 and [kept[i] for i in after.ids] == before.ids


def test_tokenizers_that_are_not_byte_level_bpe_are_refused(broad_tokenizer):
    from slmkit.compress.vocab import plan_tokenizer

    spec = json.loads((broad_tokenizer / "tokenizer.json").read_text())
    path = broad_tokenizer / "tokenizer.json"
    metaspace = {**spec, "decoder": {"type": "Metaspace"}}
    with pytest.raises(UserError, match="byte-level BPE"):
        plan_tokenizer(metaspace, {0}, path)
    fallback = {**spec, "model": {**spec["model"], "byte_fallback": True}}
    with pytest.raises(UserError, match="byte_fallback"):
        plan_tokenizer(fallback, {0}, path)
    with pytest.raises(UserError, match="another tokenizer"):
        plan_tokenizer(spec, {0, 10**6}, path)
