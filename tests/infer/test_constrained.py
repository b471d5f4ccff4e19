"""Constrained decoding: every output parses / validates; bad schemas, regexes and grammars are user errors."""

import json
import re

import pytest

from slmkit.errors import UserError
from slmkit.infer.constrained import Constraint, constraint_from_options
from slmkit.infer.engine import Engine, EngineStats
from slmkit.infer.sampling import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "kind": {"enum": ["paper", "book"]},
        "open": {"type": "boolean"},
    },
    "required": ["name", "year", "kind", "open"],
}


def _validate(obj):
    assert set(obj) == {"name", "year", "kind", "open"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 6
    assert isinstance(obj["year"], int) and 1900 <= obj["year"] <= 2100
    assert obj["kind"] in ("paper", "book")
    assert isinstance(obj["open"], bool)


@pytest.fixture(scope="module")
def engine(lm):
    return Engine(lm.model, lm.tokenizer)


def test_json_schema_output_always_validates(engine):
    constraint = Constraint.json_schema(SCHEMA)
    for seed in range(3):
        stats = EngineStats()
        outs = engine.generate(
            ["A record:", "The"],
            max_new_tokens=80,
            sampling=SamplingParams(temperature=1.0, seed=seed),
            constraint=constraint,
            stats=stats,
        )
        for out in outs:
            assert out.finish_reason == "stop", out.text
            _validate(json.loads(out.text))
        assert stats.mask_seconds > 0


def test_regex_output_always_matches(engine):
    pattern = r"[a-z]{2,5}@[a-z]{2,5}\.(com|org)"
    for seed in range(3):
        [out] = engine.generate(
            "Email:",
            max_new_tokens=40,
            sampling=SamplingParams(temperature=1.0, seed=seed),
            constraint=Constraint.regex(pattern),
        )
        assert re.fullmatch(pattern, out.text), out.text


def test_ebnf_grammar_output_always_parses(engine):
    grammar = 'root ::= "(" item (" " item){0,3} ")"\nitem ::= "yes" | "no" | [0-9]{1,2}'
    item = r"(yes|no|[0-9]{1,2})"
    for seed in range(3):
        [out] = engine.generate(
            "List:",
            max_new_tokens=40,
            sampling=SamplingParams(temperature=1.0, seed=seed),
            constraint=Constraint.grammar(grammar),
        )
        assert re.fullmatch(rf"\({item}( {item}){{0,3}}\)", out.text), out.text


def test_unconstrained_output_does_not_parse(engine):
    # the constraint is what makes the output JSON: without it this model writes English-like text
    [out] = engine.generate("A record:", max_new_tokens=30)
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


@pytest.mark.parametrize(
    "constraint, message",
    [
        (Constraint("json_schema", "{not json"), "invalid JSON schema"),
        (Constraint("json_schema", '{"type": "bogus"}'), "invalid JSON schema"),
        (Constraint("regex", "a(b"), "invalid regex"),
        (Constraint("grammar", "root ::= undefined_rule"), "invalid EBNF grammar"),
    ],
)
def test_invalid_constraints_are_user_errors(engine, constraint, message):
    with pytest.raises(UserError, match=message):
        engine.generate("The", max_new_tokens=4, constraint=constraint)


def test_constraint_options(tmp_path):
    with pytest.raises(UserError, match="at most one"):
        constraint_from_options(regex="a", grammar="g.ebnf")
    with pytest.raises(UserError, match="file not found"):
        constraint_from_options(json_schema=str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="empty"):
        Constraint.regex("")
