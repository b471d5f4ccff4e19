"""Vocabulary trimming (Ushio et al. 2023, "An Efficient Multilingual Language Model Compression through
Vocabulary Trimming"): keep only the tokens a corpus uses, drop the other rows of the embedding and the output
head, and write a tokenizer whose vocabulary and merges hold exactly the kept tokens.

Which tokens are kept: every id that occurs in the data dir's **train** split (so the corpus must have been
tokenized with this model's tokenizer), plus every added/special token, the 256 byte symbols of the byte-level
alphabet (so any text still encodes), the ids the configs name (bos/eos/pad), and, recursively, both parts of
every merge that produces a kept token.

Why encoding in-corpus text does not change: byte-level BPE turns each pre-tokenized word into bytes and then
applies the lowest-ranked applicable merge until none applies; a token, once formed, is only merged further,
never split, so every merge applied on a corpus word produces a token of the derivation tree of one of that
word's final tokens. The closure above keeps those trees, and a merge stays exactly when its result and both
parts stay; so every merge the original applies is still there, with the same rank, and no merge that the
original did not apply can be chosen before it (the kept merges are a subset, in the original order). The
run is the same, step for step, and the token strings are equal; `trim_vocabulary` checks that on a sample of
the corpus. Ids change (kept tokens are renumbered in their old order), so the model's embedding and head rows
are gathered in that order: its logits over the kept tokens are the original's logits on them, and greedy
decoding of in-corpus text is the same as long as the original's argmax is a kept token (always when the
continuation is itself in-corpus text).

A text outside the corpus still encodes (from bytes upward), possibly into more tokens than before: the
tokens it used may be gone. The data dir's val split is scored that way for the "after" measurement: val
documents whose tokens are all kept are renumbered; the others are decoded and encoded again with the trimmed
tokenizer (counted in the record as `val_documents_reencoded`).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1 << 24  # tokens counted per np.bincount call (bounded memory on large memory-mapped splits)
VERIFY_DOCUMENTS = 200  # corpus documents whose encodings are compared before and after


@dataclass
class TrimmedVal:
    """The val split in the trimmed tokenizer's ids, shaped as the part of a DataDir the measurement reads."""

    path: Path
    val: np.ndarray
    val_bytes: int

    def bytes_per_token(self, split: str = "val") -> float:
        return self.val_bytes / max(len(self.val), 1)


@dataclass
class VocabTrim:
    """What `trim_vocabulary` made: the model, the new tokenizer files, and the old id of each new id."""

    model: torch.nn.Module
    kept: list[int]  # kept[new_id] = old_id
    tokenizer_json: dict[str, Any]
    source: Path
    record: dict[str, Any] = field(default_factory=dict)

    def new_ids(self, size: int) -> np.ndarray:
        """old id -> new id (-1: dropped), for old ids below `size`."""
        table = np.full(max(size, max(self.kept) + 1), -1, dtype=np.int64)
        table[self.kept] = np.arange(len(self.kept))
        return table

    def write_files(self, directory: Path) -> None:
        """tokenizer.json, tokenizer_config.json and generation_config.json of the trimmed model, written over
        the source's copies (`_write_dir` copies those first)."""
        table = self.new_ids(0)
        text = json.dumps(self.tokenizer_json, ensure_ascii=False, indent=2)
        (directory / "tokenizer.json").write_text(text + "\n", encoding="utf-8")
        config_path = self.source / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            decoder = config.get("added_tokens_decoder")
            if isinstance(decoder, dict):
                config["added_tokens_decoder"] = {str(table[int(k)]): v for k, v in decoder.items()}
            _remap_token_ids(config, table)
            (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        written = json.loads((directory / "generation_config.json").read_text())
        generation_path = self.source / "generation_config.json"
        if generation_path.is_file():  # the source's keys (a list of eos ids, sampling defaults) survive, renumbered
            source_generation = json.loads(generation_path.read_text())
            _remap_token_ids(source_generation, table)
            written = {**written, **source_generation}
            written.pop("max_length", None)  # as checkpoint.write_state_files: transformers warns on every generate
        (directory / "generation_config.json").write_text(json.dumps(written, indent=2) + "\n")

    def remap_val(self, data: Any, tokenizer: Any) -> TrimmedVal:
        """The data dir's val split in new ids: documents (ended by the end-of-text id) whose tokens are all
        kept are renumbered, the others decoded with the original tokenizer and encoded with the trimmed one."""
        from tokenizers import Tokenizer

        val = np.asarray(data.val, dtype=np.int64)
        table = self.new_ids(int(val.max()) + 1 if len(val) else 0)
        mapped = table[val] if len(val) else val
        bytes_total = int(data.meta["splits"]["val"]["bytes"])
        dropped = mapped < 0
        if not dropped.any():
            self.record["val_documents_reencoded"] = 0
            return TrimmedVal(data.path, mapped, bytes_total)
        new_tokenizer = Tokenizer.from_str(json.dumps(self.tokenizer_json))
        ends = np.flatnonzero(val == data.eot_token_id) + 1
        bounds = [0, *ends.tolist()] + ([len(val)] if not len(ends) or ends[-1] != len(val) else [])
        pieces, redone, tokens_before, tokens_after = [], 0, 0, 0
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if not dropped[start:end].any():
                pieces.append(mapped[start:end])
                continue
            has_end = val[end - 1] == data.eot_token_id
            body = val[start : end - 1] if has_end else val[start:end]
            text = tokenizer.decode(body.tolist(), skip_special_tokens=False)
            ids = new_tokenizer.encode(text, add_special_tokens=False).ids
            if has_end:
                ids.append(int(table[data.eot_token_id]))
            pieces.append(np.asarray(ids, dtype=np.int64))
            redone += 1
            tokens_before += end - start
            tokens_after += len(ids)
        self.record["val_documents_reencoded"] = redone
        self.record["val_tokens_reencoded"] = {"before": tokens_before, "after": tokens_after}
        log.warning(
            "%d val documents use tokens the train split does not (%d tokens); they are scored re-encoded with "
            "the trimmed tokenizer (%d tokens)",
            redone,
            tokens_before,
            tokens_after,
        )
        return TrimmedVal(data.path, np.concatenate(pieces), bytes_total)


def _remap_token_ids(d: dict[str, Any], table: np.ndarray) -> None:
    """Renumber every `*_token_id` (an int or a list of ints) of a config dict in place."""
    for key, value in list(d.items()):
        if not key.endswith("_token_id"):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(table):
            d[key] = int(table[value])
        elif isinstance(value, list) and all(isinstance(v, int) and 0 <= v < len(table) for v in value):
            d[key] = [int(table[v]) for v in value]


def _config_token_ids(d: dict[str, Any]) -> set[int]:
    ids: set[int] = set()
    for key, value in d.items():
        if key.endswith("_token_id"):
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int) and v >= 0)
    return ids


def used_token_ids(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often each id below `vocab_size` occurs in `tokens` (counted in chunks of a memory-mapped split)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), CHUNK):
        chunk = np.asarray(tokens[start : start + CHUNK], dtype=np.int64)
        if len(chunk) and int(chunk.max()) >= vocab_size:
            raise UserError(
                f"the data has token id {int(chunk.max())} but the model's vocabulary is {vocab_size}; "
                "data and model do not belong together"
            )
        counts += np.bincount(chunk, minlength=vocab_size)
    return counts


def _merge_pair(merge: Any) -> tuple[str, str]:
    if isinstance(merge, str):
        parts = merge.split(" ")
    else:
        parts = list(merge)
    if len(parts) != 2:
        raise UserError(f"tokenizer.json has a merge {merge!r} that is not a pair of tokens")
    return parts[0], parts[1]


def check_byte_level(spec: dict[str, Any], path: Path) -> None:
    """UserError unless `spec` is a byte-level BPE tokenizer.json (what trimming keeps encodable via bytes)."""
    model = spec.get("model") or {}
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise UserError(
            f"{path}: vocabulary trimming needs a byte-level BPE tokenizer (model BPE, decoder ByteLevel), so that "
            f"any text still encodes from bytes; this one is model {model.get('type')!r}, decoder {decoder!r}"
        )
    if model.get("byte_fallback") or model.get("dropout"):
        raise UserError(f"{path}: BPE with byte_fallback or dropout is not supported by vocabulary trimming")


def plan_tokenizer(spec: dict[str, Any], used: set[int], path: Path) -> tuple[list[int], dict[str, Any], dict]:
    """The kept old ids (ascending) and the trimmed tokenizer.json for the ids a corpus uses (`used`)."""
    from tokenizers import pre_tokenizers

    check_byte_level(spec, path)
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges = [_merge_pair(m) for m in spec["model"].get("merges", [])]
    added = spec.get("added_tokens") or []
    by_id = {i: t for t, i in vocab.items()}
    known = set(by_id) | {a["id"] for a in added}
    unknown = sorted(used - known)
    if unknown:
        raise UserError(
            f"the data uses token ids the tokenizer {path} does not have (e.g. {unknown[:5]}); the data dir was made "
            "with another tokenizer"
        )
    keep = set(used) | {a["id"] for a in added}
    keep |= {vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab}
    producers: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges:
        producers.setdefault(a + b, []).append((a, b))
    stack = [by_id[i] for i in keep if i in by_id]
    seen = set(stack)
    while stack:
        token = stack.pop()
        for pair in producers.get(token, ()):
            for part in pair:
                if part in vocab and part not in seen:
                    seen.add(part)
                    stack.append(part)
    keep |= {vocab[t] for t in seen}
    kept = sorted(keep)
    table = {old: new for new, old in enumerate(kept)}

    new = copy.deepcopy(spec)
    new["model"]["vocab"] = {t: table[i] for t, i in sorted(vocab.items(), key=lambda x: x[1]) if i in table}
    kept_tokens = new["model"]["vocab"]
    kept_merges = [(a, b) for a, b in merges if a in kept_tokens and b in kept_tokens and a + b in kept_tokens]
    strings = bool(spec["model"].get("merges")) and isinstance(spec["model"]["merges"][0], str)
    new["model"]["merges"] = [f"{a} {b}" if strings else [a, b] for a, b in kept_merges]
    for entry in new.get("added_tokens") or []:
        entry["id"] = table[entry["id"]]
    if new.get("post_processor"):
        _remap_post_processor(new["post_processor"], table)
    stats = {"merges_before": len(merges), "merges_after": len(kept_merges)}
    return kept, new, stats


def _remap_post_processor(node: Any, table: dict[int, int]) -> None:
    """Renumber the ids a post-processor names (TemplateProcessing's `ids`, Bert/Roberta's `sep`/`cls` pairs)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                node[key] = [table[i] for i in value]
            elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                node[key] = [value[0], table[value[1]]]
            else:
                _remap_post_processor(value, table)
    elif isinstance(node, list):
        for item in node:
            _remap_post_processor(item, table)


def check_data_tokenizer(data: Any, model_dir: Path) -> None:
    """UserError unless the data dir was tokenized with the model's tokenizer.json (same bytes)."""
    from slmkit.data.tokenizer import file_sha256

    model_tok = model_dir / "tokenizer.json"
    if not model_tok.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json; vocabulary trimming rewrites it, so it must be there")
    if file_sha256(model_tok) != data.meta.get("tokenizer_sha256"):
        raise UserError(
            f"{data.path} was tokenized with a different tokenizer than {model_dir}; prepare the corpus with "
            f"`slm data prepare ... --tokenizer {model_tok}`"
        )


def _documents(tokens: np.ndarray, eot: int, limit: int) -> list[np.ndarray]:
    """Up to `limit` documents (without their end-of-text id), spread over the split."""
    ends = np.flatnonzero(np.asarray(tokens) == eot)
    if not len(ends):
        return [np.asarray(tokens[: 1 << 14])]
    starts = np.concatenate(([0], ends[:-1] + 1))
    pick = np.unique(np.linspace(0, len(ends) - 1, min(limit, len(ends))).astype(np.int64))
    return [np.asarray(tokens[starts[i] : ends[i]]) for i in pick]


def verify_encodings(old: Any, new: Any, documents: list[np.ndarray], kept: set[int]) -> int:
    """Encode each document's text with both tokenizers; the token strings must be equal wherever the original
    encoding uses kept tokens only. Returns the number of documents compared. A difference is a bug: raises."""
    compared = 0
    for ids in documents:
        text = old.decode(ids.tolist(), skip_special_tokens=False)
        before = old.encode(text, add_special_tokens=False)
        if not set(before.ids) <= kept:  # decode -> encode is not always the identity; such text is not "in corpus"
            continue
        after = new.encode(text, add_special_tokens=False)
        if after.tokens != before.tokens:
            raise RuntimeError(f"trimmed tokenizer encodes {text[:80]!r} differently: {after.tokens[:20]}")
        compared += 1
    return compared


@torch.no_grad()
def trim_model(model: torch.nn.Module, kept: list[int], table: np.ndarray) -> torch.nn.Module:
    """A copy of the float `model` with only the `kept` rows of its embedding and head (in that order), its
    config's vocab_size and token ids renumbered."""
    from slmkit.models import build_model

    config = model.config
    remap = {}
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(config, name)
        remap[name] = None if value is None else int(table[value])
    extra = dict(config.extra)
    _remap_token_ids(extra, table)
    new_config = config.replace(vocab_size=len(kept), extra=extra, **remap)
    index = torch.tensor(kept, dtype=torch.long)
    state = model.state_dict()
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name in state:
            state[name] = state[name].index_select(0, index).clone()
    trimmed = build_model(new_config)
    trimmed.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        trimmed.lm_head.weight = trimmed.embed_tokens.weight
    return trimmed.eval()


def trim_vocabulary(model: torch.nn.Module, source: Path, data: Any) -> VocabTrim:
    """Trim the float `model` (loaded from the model dir `source`) to the tokens the train split of the data dir
    `data` uses; see the module notes. UserError where there is nothing to trim."""
    from tokenizers import Tokenizer

    check_data_tokenizer(data, source)
    if getattr(model, "compression", None) is not None:
        raise UserError(f"{source}: the model is quantized or factored; trim the vocabulary of its float original")
    config = model.config
    path = source / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    counts = used_token_ids(data.train, config.vocab_size)
    if not counts.any():
        raise UserError(f"the train split of {data.path} is empty: there is no corpus to count tokens over")
    used = set(np.flatnonzero(counts).tolist())
    used |= {i for i in (config.bos_token_id, config.eos_token_id) if i is not None}
    used |= _config_token_ids(config.extra)
    generation_path = source / "generation_config.json"
    if generation_path.is_file():
        used |= _config_token_ids(json.loads(generation_path.read_text()))
    used = {i for i in used if i < config.vocab_size}
    kept, new_spec, stats = plan_tokenizer(spec, used, path)
    if kept[-1] >= config.vocab_size:
        raise UserError(
            f"{path} has token id {kept[-1]} but the model's vocabulary is {config.vocab_size}; tokenizer and model "
            "do not belong together"
        )
    if len(kept) == config.vocab_size:
        raise UserError(
            f"nothing to trim: the train split of {data.path} (with the special and byte tokens and the parts of "
            f"the merges that build its tokens) uses all {config.vocab_size} tokens of the model; nothing written"
        )
    old_tokenizer = Tokenizer.from_file(str(path))
    new_tokenizer = Tokenizer.from_str(json.dumps(new_spec))
    if new_tokenizer.get_vocab_size(with_added_tokens=True) != len(kept):
        raise RuntimeError(
            f"trimmed tokenizer has {new_tokenizer.get_vocab_size(with_added_tokens=True)} tokens, expected {len(kept)}"
        )
    documents = _documents(data.train, data.eot_token_id, VERIFY_DOCUMENTS)
    compared = verify_encodings(old_tokenizer, new_tokenizer, documents, set(kept))
    table = np.full(config.vocab_size, -1, dtype=np.int64)
    table[kept] = np.arange(len(kept))
    trimmed = trim_model(model, kept, table)
    params_before = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    params_after = sum(p.numel() for p in {id(p): p for p in trimmed.parameters()}.values())
    bytes_removed = sum(
        (config.vocab_size - len(kept)) * t.shape[1] * t.element_size()
        for name, t in model.state_dict().items()
        if name == "embed_tokens.weight" or (name == "lm_head.weight" and not config.tie_embeddings)
    )
    record = {
        "method": "vocab-trim",
        "vocab_before": config.vocab_size,
        "vocab_after": len(kept),
        "corpus_tokens_used": int(np.count_nonzero(counts)),
        "corpus_tokens_counted": int(counts.sum()),
        **stats,
        "parameters_before": params_before,
        "parameters_after": params_after,
        "weight_bytes_removed": bytes_removed,
        "documents_verified": compared,
    }
    log.info(
        "vocabulary %d -> %d tokens (%d used by the corpus); %d -> %d parameters",
        config.vocab_size,
        len(kept),
        record["corpus_tokens_used"],
        params_before,
        params_after,
    )
    return VocabTrim(model=trimmed, kept=kept, tokenizer_json=new_spec, source=source, record=record)
