"""A saved model directory loads and generates in transformers without warnings from its own files."""

from __future__ import annotations

import json
import logging
import warnings

import pytest


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    """transformers' warnings (its logger, and Python warnings) while the test runs."""
    from transformers.utils import logging as hf_logging

    handler = _Records()
    logger = hf_logging.get_logger()
    logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield handler.messages, caught
    logger.removeHandler(handler)


def test_generation_config_is_greedy_and_quiet(tiny_model_dir, transformers_log):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert "max_length" not in generation and generation["do_sample"] is False
    assert generation.get("temperature", 1.0) == 1.0  # neutral: nothing a greedy default would ignore

    messages, caught = transformers_log
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("The model", return_tensors="pt").input_ids
    first = model.generate(ids, max_new_tokens=5)
    second = model.generate(ids, max_new_tokens=5)
    assert first.tolist() == second.tolist()  # greedy
    assert messages == [] and [str(w.message) for w in caught if "transformers" in w.filename] == []

    # the text-generation pipeline stays greedy and finds nothing invalid in our generation config (it still
    # warns about its own max_length/max_new_tokens handling, as for any transformers-saved model)
    out = pipeline("text-generation", model=model, tokenizer=tokenizer)("The model", max_new_tokens=5)
    assert out[0]["generated_text"] == tokenizer.decode(first[0])
    assert not [m for m in messages if "not valid" in m or "temperature" in m], messages
