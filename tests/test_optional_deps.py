"""Optional dependencies (xgrammar, lm-eval) missing: every way in ends in one clear error naming the pip command
(the Python API raises MissingDependency, the CLI prints one `error:` line and exits 2, the server answers 400)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slmkit_testing import SRC, run_slm

XGRAMMAR_INSTALL = "pip install 'xgrammar>=0.2.8,<0.3'"
LM_EVAL_INSTALL = "pip install 'lm-eval>=0.4.13,<0.5'"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def block(monkeypatch, package: str) -> None:
    """Make `import package` (and its submodules) fail in this process as if it were not installed."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)  # import then raises ModuleNotFoundError(name=package)


def blocked_python(package: str, code: str) -> list[str]:
    """A `python -c` command line that runs `code` with `package` missing."""
    prelude = f"import sys; sys.modules[{package!r}] = None; sys.path.insert(0, {str(SRC)!r})"
    return [sys.executable, "-c", f"{prelude}; {code}"]


def assert_one_error_line(result: subprocess.CompletedProcess, install: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and install in line, line


def test_require_names_the_pip_command(monkeypatch):
    from slmkit.errors import MissingDependency, UserError
    from slmkit.optional import require

    block(monkeypatch, "xgrammar")
    with pytest.raises(MissingDependency) as info:
        require("xgrammar", "constrained")
    assert isinstance(info.value, UserError) and info.value.exit_code == 2
    assert info.value.module == "xgrammar" and info.value.install == XGRAMMAR_INSTALL
    assert "constrained decoding" in str(info.value) and XGRAMMAR_INSTALL in str(info.value)
    assert "not installed" in str(info.value)

    block(monkeypatch, "lm_eval")
    with pytest.raises(MissingDependency, match="lm-evaluation-harness") as info:
        require("lm_eval.api.model", "lm-eval")
    assert info.value.module == "lm_eval" and LM_EVAL_INSTALL in str(info.value)


def test_require_reports_a_package_that_does_not_import(monkeypatch, tmp_path):
    from slmkit.errors import MissingDependency
    from slmkit.optional import require

    (tmp_path / "brokenpkg_for_slmkit.py").write_text("import a_dependency_nobody_installed_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependency) as info:
        require("brokenpkg_for_slmkit", "constrained")
    message = str(info.value)
    assert "installed but does not import" in message and "a_dependency_nobody_installed_xyz" in message
    assert XGRAMMAR_INSTALL in message


def test_constrained_generate_without_xgrammar_python_api(monkeypatch, tiny_model_dir):
    from slmkit.api import generate, load
    from slmkit.errors import MissingDependency
    from slmkit.infer.constrained import Constraint
    from slmkit.infer.engine import Engine

    lm = load(tiny_model_dir)
    block(monkeypatch, "xgrammar")
    with pytest.raises(MissingDependency) as info:
        generate(lm, "The", max_new_tokens=4, json_schema=SCHEMA)
    assert XGRAMMAR_INSTALL in str(info.value)
    with pytest.raises(MissingDependency, match="xgrammar"):
        Engine(lm.model, lm.tokenizer).generate("The", max_new_tokens=4, constraint=Constraint.regex("[a-z]+"))
    assert generate(lm, "The", max_new_tokens=4)  # unconstrained generation does not need it


def test_cli_generate_without_xgrammar_is_one_error_line(tmp_path, tiny_model_dir):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    code = "from slmkit.cli import main; sys.argv[1:] = sys.argv[2:]; main()"
    for option in (["--json-schema", str(schema)], ["--regex", "[a-z]+"]):
        args = ["generate", str(tiny_model_dir), "--prompt", "The", "--max-new-tokens", "4", *option]
        result = subprocess.run(
            [*blocked_python("xgrammar", code), "slm", *args], capture_output=True, text=True, timeout=300
        )
        assert_one_error_line(result, XGRAMMAR_INSTALL)
    # the wrapper itself runs the CLI: without the block the same command works
    result = run_slm("generate", tiny_model_dir, "--prompt", "The", "--max-new-tokens", 4, "--regex", "[a-z]+")
    assert result.returncode == 0, result.stderr


def test_lm_eval_adapter_without_lm_eval(monkeypatch):
    from slmkit.errors import MissingDependency

    monkeypatch.delitem(sys.modules, "slmkit.eval.lm_eval_adapter", raising=False)
    block(monkeypatch, "lm_eval")
    with pytest.raises(MissingDependency) as info:
        import slmkit.eval.lm_eval_adapter  # noqa: F401
    assert LM_EVAL_INSTALL in str(info.value)

    code = "import runpy; runpy.run_module('slmkit.eval.lm_eval_adapter', run_name='__main__')"
    command = [*blocked_python("lm_eval", code), "--tasks", "x"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert_one_error_line(result, LM_EVAL_INSTALL)


def test_server_response_format_without_xgrammar_is_400(monkeypatch, tiny_model_dir):
    from fastapi.testclient import TestClient

    from slmkit.infer.engine import Engine
    from slmkit.serve.app import create_app

    engine = Engine.load(tiny_model_dir, device="cpu")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
    with TestClient(create_app(engine, model_name="tiny")) as client:
        block(monkeypatch, "xgrammar")
        for path, request in (
            ("/v1/chat/completions", {**body, "response_format": fmt}),
            ("/v1/chat/completions", {**body, "response_format": {"type": "json_object"}, "stream": True}),
            ("/v1/completions", {"model": "tiny", "prompt": "The", "max_tokens": 4, "response_format": fmt}),
        ):
            r = client.post(path, json=request)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == "response_format", error
            assert XGRAMMAR_INSTALL in error["message"]
        r = client.post("/v1/chat/completions", json=body)  # the server goes on serving
        assert r.status_code == 200, r.text
