"""Supervised fine-tuning data: chat or prompt/completion JSONL, a chat template, loss masks, packed rows.

A line of the JSONL file is one sample, either a conversation
``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` or a pair
``{"prompt": "...", "completion": "..."}``. A conversation is rendered with the model's chat template (the
``chat_template`` of its tokenizer_config.json, else `DEFAULT_CHAT_TEMPLATE`); a pair is the prompt followed by
the completion and the end-of-text token. The loss falls on what the model should learn to write: each
assistant message and the end-of-text token that closes it (a completion and its end-of-text token), unless
`loss_on_prompt` trains every token ("Instruction Tuning With Loss Over Instructions").

Which tokens an assistant message covers is found from the template itself: the conversation is rendered
message by message, so the characters each message adds are known, and a token is trained when it starts
inside the assistant's text. Templates that are not incremental (rendering a longer conversation changes the
text of an earlier part) are refused, since no mask could be trusted.

Samples are packed first-fit into rows of `seq_len` tokens with a segment id and positions restarting at 0
for each sample, so the model can keep them apart (`Transformer.forward(segments=...)`); models whose mixers
cannot (recurrent state crosses sample boundaries) get one sample per row instead (`pack=False`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slmkit.data.tokenizer import EOT_TOKEN
from slmkit.errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# The template slmkit's own models use (and `slm serve` falls back to): each message as `<|role|>` on its own
# line, the assistant's text closed by the end-of-text token, and `<|assistant|>` opening the answer.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
    "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLES = ("system", "user", "assistant")
IGNORE = -100  # a target that carries no loss (cross_entropy's ignore_index)


@dataclass(frozen=True)
class Encoded:
    """One tokenized sample: ids (N,) and, per id, whether predicting it carries loss."""

    ids: np.ndarray  # int64 (N,)
    trained: np.ndarray  # bool (N,)
    nbytes: np.ndarray  # int64 (N,): UTF-8 bytes of each token's text (bits per byte of the trained tokens)


def load_chat_template(model_dir: Path | None) -> str:
    """The ``chat_template`` of the model dir's tokenizer_config.json, else `DEFAULT_CHAT_TEMPLATE`."""
    if model_dir is not None:
        path = Path(model_dir) / "tokenizer_config.json"
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except (OSError, ValueError, AttributeError):
                template = None
            if isinstance(template, str) and template:
                return template
    return DEFAULT_CHAT_TEMPLATE


def eos_text(model_dir: Path | None) -> str:
    """The text of the model's end-of-sequence token: tokenizer_config.json's `eos_token` (a Hugging Face model's
    own, e.g. `</s>` or `<|im_end|>`), else slmkit's end-of-text token."""
    if model_dir is not None:
        path = Path(model_dir) / "tokenizer_config.json"
        try:
            eos = json.loads(path.read_text()).get("eos_token") if path.is_file() else None
        except (OSError, ValueError, AttributeError):
            eos = None
        if isinstance(eos, dict):  # the AddedToken form
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return EOT_TOKEN


def compile_chat_template(source: str) -> Any:
    """A Jinja template in a sandbox: a model dir's template is data from elsewhere and must not reach Python."""
    import jinja2.sandbox

    return jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(source)


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """The samples of a JSONL file, each checked: one UserError naming the file and line for the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: fine-tuning data not found (a JSONL file of chat or prompt/completion samples)")
    samples: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
            if not line:
                continue
            try:
                sample = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.args[0] if exc.args else exc})") from None
            samples.append(check_sample(sample, where))
    if not samples:
        raise UserError(
            f"{path}: no samples (expected one JSON object per line with `messages`, or `prompt` and `completion`)"
        )
    return samples


def check_sample(sample: Any, where: str) -> dict[str, Any]:
    if not isinstance(sample, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(sample).__name__}")
    if "messages" in sample:
        messages = sample["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: messages[{i}] must be an object with string `role` and `content`")
            if m["role"] not in ROLES:
                raise UserError(
                    f"{where}: messages[{i}] has role {m['role']!r}, which the chat template does not know; "
                    f"use one of {', '.join(ROLES)}"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: the conversation has no assistant message to learn from")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if "prompt" in sample or "completion" in sample:
        for key in ("prompt", "completion"):
            if not isinstance(sample.get(key), str):
                raise UserError(f"{where}: `{key}` must be a string (a sample is `prompt` plus `completion`)")
        if not sample["completion"]:
            raise UserError(f"{where}: `completion` is empty")
        return {"prompt": sample["prompt"], "completion": sample["completion"]}
    raise UserError(f"{where}: a sample needs `messages`, or `prompt` and `completion`; got keys {sorted(sample)}")


class SampleEncoder:
    """Renders and tokenizes samples with one tokenizer and chat template, marking the tokens that train."""

    def __init__(
        self, tokenizer: Tokenizer, template: str, loss_on_prompt: bool = False, eos_token: str = EOT_TOKEN
    ) -> None:
        self.tokenizer = tokenizer
        self.template_source = template
        self.template = compile_chat_template(template)
        self.loss_on_prompt = loss_on_prompt
        self.eos = eos_token

    def render(self, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return self.template.render(
                messages=list(messages), add_generation_prompt=generation_prompt, bos_token="", eos_token=self.eos
            )
        except Exception as exc:  # a broken template in the model dir
            raise UserError(f"cannot apply the chat template: {exc}") from None

    def spans(self, sample: dict[str, Any], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The sample's text and the character spans that carry loss."""
        if "prompt" in sample:
            text = sample["prompt"] + sample["completion"] + self.eos
            start = 0 if self.loss_on_prompt else len(sample["prompt"])
            return text, [(start, len(text))]
        messages = sample["messages"]
        text = self.render(messages, generation_prompt=False)
        if self.loss_on_prompt:
            return text, [(0, len(text))]
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], generation_prompt=True)
            upto = self.render(messages[: i + 1], generation_prompt=False)
            if not (text.startswith(upto) and upto.startswith(before)):
                raise UserError(
                    f"{where}: the chat template is not incremental (the text of the first {i + 1} messages is not a "
                    "prefix of the whole conversation), so the assistant tokens cannot be found; use a template "
                    "that renders each message after the previous ones"
                )
            found = upto.find(m["content"], len(before))
            if found < 0:
                raise UserError(f"{where}: the chat template does not render messages[{i}]'s content as it is")
            end = found + len(m["content"])
            if upto.startswith(self.eos, end):
                end += len(self.eos)
            spans.append((found, end))
        return text, spans

    def encode(self, sample: dict[str, Any], where: str = "sample") -> Encoded:
        text, spans = self.spans(sample, where)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        starts = np.asarray([start for start, _ in encoding.offsets], dtype=np.int64)
        nbytes = np.asarray([len(text[lo:hi].encode("utf-8")) for lo, hi in encoding.offsets], dtype=np.int64)
        trained = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:
            trained |= (starts >= lo) & (starts < hi)
        if len(trained):
            trained[0] = False  # the first token is never predicted
        return Encoded(ids, trained, nbytes)


@dataclass
class PackedRows:
    """Samples packed into rows of `seq_len` next-token pairs: inputs, targets (IGNORE where no loss), the
    sample each position belongs to (-1: padding) and its position within the sample."""

    inputs: np.ndarray  # int64 (R, seq_len)
    targets: np.ndarray  # int64 (R, seq_len)
    segments: np.ndarray  # int64 (R, seq_len)
    positions: np.ndarray  # int64 (R, seq_len)
    trained_tokens: int
    trained_bytes: int
    truncated: int  # samples cut to fit a row

    def __len__(self) -> int:
        return self.inputs.shape[0]


def pack(samples: Sequence[Encoded], seq_len: int, pad_id: int, packed: bool = True) -> PackedRows:
    """Rows of next-token pairs, first-fit in the given order (one sample per row when not `packed`).

    A sample of N tokens gives N - 1 pairs; one longer than a row keeps its first seq_len + 1 tokens. Samples
    with no trained target left are dropped.
    """
    rows: list[list[tuple[int, np.ndarray, np.ndarray]]] = []  # per row: (segment, inputs, targets)
    free: list[int] = []
    truncated = trained_tokens = trained_bytes = 0
    for index, sample in enumerate(samples):
        ids, trained, nbytes = sample.ids, sample.trained, sample.nbytes
        if len(ids) > seq_len + 1:
            ids, trained, nbytes = ids[: seq_len + 1], trained[: seq_len + 1], nbytes[: seq_len + 1]
            truncated += 1
        targets = np.where(trained[1:], ids[1:], IGNORE)
        n_trained = int(trained[1:].sum())
        if len(ids) < 2 or n_trained == 0:
            continue
        trained_tokens += n_trained
        trained_bytes += int(nbytes[1:][trained[1:]].sum())
        n = len(ids) - 1
        slot = next((r for r, space in enumerate(free) if space >= n), None) if packed else None
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append((index, ids[:-1], targets))
        free[slot] -= n
    if not rows:
        raise UserError("no sample has a token to learn from (every target is masked or the samples are empty)")
    shape = (len(rows), seq_len)
    inputs = np.full(shape, pad_id, dtype=np.int64)
    target_rows = np.full(shape, IGNORE, dtype=np.int64)
    segments = np.full(shape, -1, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for index, x, y in row:
            n = len(x)
            inputs[r, at : at + n], target_rows[r, at : at + n] = x, y
            segments[r, at : at + n] = index
            positions[r, at : at + n] = np.arange(n)
            at += n
        positions[r, at:] = np.arange(seq_len - at)  # padding: its own segment (-1), never a target
    return PackedRows(inputs, target_rows, segments, positions, trained_tokens, trained_bytes, truncated)


class SFTData:
    """A fine-tuning set: train and validation rows packed from a JSONL file, as the training loop reads them.

    `meta` and `train` give the loop what it records to refuse a resume on other data (the tokenizer's hash,
    and the number of train tokens, here with the file's hash).
    """

    def __init__(
        self,
        path: str | Path,
        model_dir: str | Path,
        seq_len: int,
        *,
        template: str | None = None,
        loss_on_prompt: bool = False,
        packed: bool = True,
        val_fraction: float = 0.05,
        val_path: str | Path | None = None,
        seed: int = 1337,
    ) -> None:
        from tokenizers import Tokenizer

        from slmkit.data.tokenizer import file_sha256

        self.path = Path(path)
        model_dir = Path(model_dir)
        tokenizer_json = model_dir / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise UserError(f"{model_dir}: no tokenizer.json; fine-tuning needs the model's own tokenizer")
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.template = template if template is not None else load_chat_template(model_dir)
        eos = eos_text(model_dir)
        eos_id = tokenizer.token_to_id(eos)
        if eos_id is None:
            raise UserError(
                f"{model_dir}: its end-of-sequence token {eos!r} (tokenizer_config.json) is not in tokenizer.json; "
                "fine-tuning ends every answer with it"
            )
        encoder = SampleEncoder(tokenizer, self.template, loss_on_prompt, eos)
        samples = read_samples(self.path)
        encoded = [encoder.encode(s, f"{self.path}:sample {i + 1}") for i, s in enumerate(samples)]
        if val_path is not None:
            val_samples = read_samples(val_path)
            val_encoded = [encoder.encode(s, f"{val_path}:sample {i + 1}") for i, s in enumerate(val_samples)]
            train_encoded = encoded
        else:
            if not (0 <= val_fraction < 1):
                raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
            order = np.random.default_rng(seed).permutation(len(encoded))
            n_val = math.floor(len(encoded) * val_fraction) if len(encoded) > 1 else 0
            val_encoded = [encoded[i] for i in sorted(order[:n_val])]
            train_encoded = [encoded[i] for i in sorted(order[n_val:])]
        pad_id = int(eos_id)
        # the train order is shuffled before packing, so neighbours in a row are unrelated samples
        shuffled = [train_encoded[i] for i in np.random.default_rng([seed, 1]).permutation(len(train_encoded))]
        self.train_rows = pack(shuffled, seq_len, pad_id, packed)
        self.val_rows = pack(val_encoded, seq_len, pad_id, packed) if val_encoded else None
        self.packed = packed
        self.samples = len(samples)
        self.train = self.train_rows.inputs.reshape(-1)  # what resume checks count
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.meta = {"tokenizer_sha256": file_sha256(tokenizer_json), "source_sha256": digest}
        self.val = np.zeros(0, dtype=np.int64)

    def bytes_per_token(self, split: str) -> float:
        rows = self.val_rows if split == "val" else self.train_rows
        if rows is None or rows.trained_tokens == 0:
            return math.nan
        return rows.trained_bytes / rows.trained_tokens

    def summary(self) -> dict[str, Any]:
        val = self.val_rows
        return {
            "samples": self.samples,
            "train_rows": len(self.train_rows),
            "train_trained_tokens": self.train_rows.trained_tokens,
            "val_rows": len(val) if val is not None else 0,
            "val_trained_tokens": val.trained_tokens if val is not None else 0,
            "truncated": self.train_rows.truncated + (val.truncated if val is not None else 0),
            "packed": self.packed,
        }
