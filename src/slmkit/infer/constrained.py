"""Grammar-constrained decoding with xgrammar: JSON schema, regular expression or EBNF grammar.

A :class:`Constraint` names what the output must match. :func:`compile_constraint` turns it into an
xgrammar ``CompiledGrammar`` for a tokenizer (done once per request, cached per tokenizer), and a
:class:`GrammarState` per sequence masks the logits of every step to the tokens the grammar allows and
advances on the chosen token. The end-of-text token is the grammar's stop token: once the output is
complete only it is allowed, so a finished output always parses.

xgrammar is imported only when a constraint is used (it takes seconds to import). It is optional (the
``constrained`` extra): without it a constraint is a :class:`slmkit.errors.MissingDependency` naming the pip command.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from slmkit.errors import UserError
from slmkit.optional import require

logger = logging.getLogger(__name__)

ConstraintKind = Literal["json_schema", "regex", "grammar"]


@dataclass(frozen=True)
class Constraint:
    """What the output must match. ``value``: a JSON schema (text), a regex, or an EBNF grammar (GBNF)."""

    kind: ConstraintKind
    value: str

    def __post_init__(self) -> None:
        if self.kind not in ("json_schema", "regex", "grammar"):
            raise UserError(f"constraint kind must be json_schema, regex or grammar, got {self.kind!r}")
        if not isinstance(self.value, str) or not self.value.strip():
            raise UserError(f"empty {self.kind.replace('_', ' ')}: give a non-empty one")

    @classmethod
    def json_schema(cls, schema: str | dict[str, Any]) -> Constraint:
        if isinstance(schema, dict):
            schema = json.dumps(schema)
        return cls("json_schema", schema)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, ebnf: str) -> Constraint:
        return cls("grammar", ebnf)


_COMPILERS: dict[tuple[int, int, int | None], Any] = {}
_CONTROL_TOKENS: dict[tuple[int, int, int | None], torch.Tensor] = {}


@dataclass
class CompiledConstraint:
    grammar: Any  # xgrammar.CompiledGrammar
    banned: torch.Tensor | None  # (V,) bool: tokens never allowed on top of the grammar


def _control_tokens(key: tuple[int, int, int | None], info: Any, vocab_size: int) -> torch.Tensor:
    """Tokens holding a raw control character (bytes 0x00-0x1f).

    xgrammar's JSON strings admit raw control characters, which strict JSON parsers (Python's json)
    reject; compact JSON never needs them outside strings (inside they are escaped as \\n, \\t, ...).
    """
    if key not in _CONTROL_TOKENS:
        banned = torch.zeros(vocab_size, dtype=torch.bool)
        special = set(info.special_token_ids)
        for i, token in enumerate(info.decoded_vocab[:vocab_size]):
            if i not in special and any(b < 0x20 for b in token):
                banned[i] = True
        _CONTROL_TOKENS[key] = banned
    return _CONTROL_TOKENS[key]


def _xgrammar() -> Any:
    return require("xgrammar", "constrained")


def _compiler(tokenizer: Any, vocab_size: int, eos_token_id: int | None):
    xgr = _xgrammar()

    key = (id(tokenizer), vocab_size, eos_token_id)
    if key not in _COMPILERS:
        from transformers import PreTrainedTokenizerFast

        hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        stop = [eos_token_id] if eos_token_id is not None else None
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=stop)
        _COMPILERS[key] = (xgr.GrammarCompiler(info, max_threads=2), info)
    return _COMPILERS[key], key


def compile_constraint(constraint: Constraint, tokenizer: Any, vocab_size: int, eos_token_id: int | None):
    """An xgrammar CompiledGrammar for `constraint`; an invalid schema/regex/grammar is a UserError."""
    if eos_token_id is None:
        raise UserError("constrained decoding needs the model's eos_token_id (set it in config.json)")
    (compiler, info), key = _compiler(tokenizer, vocab_size, eos_token_id)
    banned = None
    what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "EBNF grammar"}[constraint.kind]
    start = time.perf_counter()
    try:
        if constraint.kind == "json_schema":
            try:
                schema = json.loads(constraint.value)
            except json.JSONDecodeError as exc:
                raise UserError(f"invalid JSON schema: not valid JSON ({exc})") from None
            if not isinstance(schema, dict):
                raise UserError("invalid JSON schema: expected a JSON object")
            # compact output: a small model cannot then wander off into endless whitespace
            compiled = compiler.compile_json_schema(constraint.value, any_whitespace=False)
            banned = _control_tokens(key, info, vocab_size)
        elif constraint.kind == "regex":
            compiled = compiler.compile_regex(constraint.value)
        else:
            compiled = compiler.compile_grammar(constraint.value)
    except UserError:
        raise
    except Exception as exc:  # xgrammar reports bad input as RuntimeError / ValueError / its own types
        text = str(exc).strip()
        message = text.splitlines()[0] if text else type(exc).__name__
        message = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", message)  # drop xgrammar's "[time] file.cc:N: "
        raise UserError(f"invalid {what}: {message}") from None
    logger.info("compiled %s in %.1f ms", what, (time.perf_counter() - start) * 1e3)
    return CompiledConstraint(compiled, banned)


class GrammarState:
    """One sequence's matcher: masks logits to allowed tokens and advances on each chosen token."""

    def __init__(self, compiled: CompiledConstraint, vocab_size: int) -> None:
        xgr = _xgrammar()
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled.grammar)
        self.banned = compiled.banned
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.mask_seconds = 0.0  # time spent computing and applying masks (the constraint's overhead)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def mask_(self, logits: torch.Tensor) -> None:
        """Set disallowed entries of logits (V,) or (1, V) to -inf, in place."""
        start = time.perf_counter()
        if self.matcher.fill_next_token_bitmask(self.bitmask):
            row = logits.view(1, -1)
            self._xgr.apply_token_bitmask_inplace(row, self.bitmask.to(logits.device))
        if self.banned is not None:
            logits.view(-1)[: self.banned.numel()].masked_fill_(self.banned.to(logits.device), float("-inf"))
        self.mask_seconds += time.perf_counter() - start

    def accept(self, token: int) -> None:
        start = time.perf_counter()
        ok = self.matcher.accept_token(int(token))
        self.mask_seconds += time.perf_counter() - start
        if not ok:  # cannot happen when the token was drawn from masked logits
            raise RuntimeError(f"grammar rejected token {token}")


def constraint_from_options(
    json_schema: str | None = None, regex: str | None = None, grammar: str | None = None
) -> Constraint | None:
    """The constraint named by CLI-style options: a JSON schema file, a regex, an EBNF grammar file (one at most)."""
    given = [
        name for name, value in (("--json-schema", json_schema), ("--regex", regex), ("--grammar", grammar)) if value
    ]
    if len(given) > 1:
        raise UserError(f"give at most one of --json-schema, --regex and --grammar (got {', '.join(given)})")
    constraint = _read_options(json_schema, regex, grammar)
    if constraint is not None:
        _xgrammar()  # a missing xgrammar ends the command here, before a model is loaded
    return constraint


def _read_options(json_schema: str | None, regex: str | None, grammar: str | None) -> Constraint | None:
    from pathlib import Path

    if regex is not None:
        return Constraint.regex(regex)
    for value, kind in ((json_schema, "json_schema"), (grammar, "grammar")):
        if value is None:
            continue
        path = Path(value)
        if not path.is_file():
            raise UserError(f"{path}: file not found (--{kind.replace('_', '-')} expects a file)")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read it as text ({exc})") from None
        return Constraint(kind, text)  # type: ignore[arg-type]
    return None
