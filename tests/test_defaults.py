"""One source of sampling defaults (`slmkit.defaults`): the CLI, the Python API and SamplingParams agree; the
server takes OpenAI's."""

from __future__ import annotations

import inspect

import pytest

from slmkit import defaults

LIBRARY = {
    "max_new_tokens": defaults.MAX_NEW_TOKENS,
    "temperature": defaults.TEMPERATURE,
    "top_k": defaults.TOP_K,
    "top_p": defaults.TOP_P,
    "min_p": defaults.MIN_P,
    "repetition_penalty": defaults.REPETITION_PENALTY,
    "frequency_penalty": defaults.FREQUENCY_PENALTY,
    "presence_penalty": defaults.PRESENCE_PENALTY,
}


def test_sampling_params_defaults_are_the_library_defaults():
    from slmkit.infer.sampling import SamplingParams

    given = {k: v for k, v in LIBRARY.items() if k != "max_new_tokens"}
    assert SamplingParams() == SamplingParams(**given)


def test_cli_and_api_take_the_library_defaults():
    import typer.main

    from slmkit import api, cli

    command = typer.main.get_command(cli.app).commands["generate"]
    cli_defaults = {p.name: p.default for p in command.params if p.name in LIBRARY}
    api_defaults = {
        name: p.default for name, p in inspect.signature(api.generate).parameters.items() if name in LIBRARY
    }
    assert cli_defaults == LIBRARY
    assert api_defaults == LIBRARY


def test_server_takes_openai_defaults():
    from slmkit.serve.openai import ChatRequest, CompletionRequest

    request = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    assert (request.temperature, request.top_p) == (1.0, 1.0)  # OpenAI's documented defaults
    assert (request.frequency_penalty, request.presence_penalty) == (0.0, 0.0)
    assert request.max_tokens is None  # filled in per endpoint: 16 for completions, the rest of the context for chat
    assert defaults.OPENAI_COMPLETION_MAX_TOKENS == 16
    chat = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert (chat.temperature, chat.top_p) == (1.0, 1.0)


@pytest.fixture(scope="module")
def varied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with shaken weights: the briefly trained one repeats one token whatever the sampling."""
    import torch

    from slmkit.api import load
    from slmkit.interop.checkpoint import save_model

    lm = load(tiny_model_dir, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return save_model(lm.model, tmp_path_factory.mktemp("defaults") / "varied", tokenizer_dir=tiny_model_dir)


def test_slm_generate_without_options_is_what_slmkit_generate_gives(varied_model_dir):
    from typer.testing import CliRunner

    from slmkit import api, cli

    def slm_generate(*options):
        args = ["generate", str(varied_model_dir), "--prompt", "The cat", "--max-new-tokens", "12", *options]
        result = CliRunner().invoke(cli.app, args)
        assert result.exit_code == 0, result.output
        return result.output.rstrip("\n")

    expected = "The cat" + api.generate(varied_model_dir, "The cat", max_new_tokens=12)
    assert slm_generate() == expected
    sampled = {slm_generate("--temperature", "1", "--seed", str(seed)) for seed in range(3)}
    assert sampled - {expected}  # the model does vary under sampling, so the default really is greedy
