"""`slm merge`: every method equals mergekit's result on tiny random Llama models saved as slmkit dirs (mergekit run
in-process on the same files), the edge cases the papers promise (one model returns it, TIES of identical models,
SLERP's endpoints), DARE's drop as a property, and one clear error per bad input."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from slmkit.errors import UserError
from slmkit_testing import SRC, run_slm

TINY = dict(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, tie_embeddings=False)


def make_dir(directory: Path, data_dir: Path, seed: int, base: Path | None = None, scale: float = 0.05, **changes):
    """A random-init model dir; with `base`, the base's weights plus seeded noise (a stand-in for a fine-tune:
    deltas small next to the weights, of mixed signs, different per model)."""
    from slmkit.config import ModelConfig
    from slmkit.data.shards import load_data_dir
    from slmkit.interop.checkpoint import load_model, save_model
    from slmkit.models import build_model

    data = load_data_dir(data_dir)
    if base is not None:
        model = load_model(base)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1.0))
    else:
        fields = {**TINY, "vocab_size": data.vocab_size, **changes}
        model = build_model(ModelConfig(bos_token_id=data.eot_token_id, eos_token_id=data.eot_token_id, **fields))
        model.init_weights(seed=seed)
        with torch.no_grad():  # norms away from 1, so that a method mishandling 1-D tensors shows
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return save_model(model, directory, tokenizer_dir=data_dir)


@pytest.fixture(scope="module")
def models(tmp_path_factory, data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    base = make_dir(root / "base", data_dir, seed=0)
    found = {"base": base}
    for i in (1, 2, 3):
        found[f"ft{i}"] = make_dir(root / f"ft{i}", data_dir, seed=i, base=base)
    found["ft1_copy"] = root / "ft1_copy"
    shutil.copytree(found["ft1"], found["ft1_copy"])
    found["other"] = make_dir(root / "other", data_dir, seed=7)  # a different random model: SLERP's far endpoint
    return found


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from slmkit.interop.checkpoint import load_weights

    return load_weights(Path(directory))


def ours(yaml_text: str, tmp_path: Path, name: str = "ours", seed: int = 0) -> dict[str, torch.Tensor]:
    from slmkit.api import merge

    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml_text)
    result = merge(config, tmp_path / name, seed=seed)
    return weights(result.out)


def mergekit(yaml_text: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(yaml_text))
    options = MergeOptions(cuda=False, copy_tokenizer=False, quiet=True, write_model_card=False)
    run_merge(config, str(tmp_path / "mergekit"), options)
    return weights(tmp_path / "mergekit")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.allclose(a[name].float(), b[name].float(), atol=atol, rtol=0), (
            name,
            (a[name].float() - b[name].float()).abs().max().item(),
        )


# every method against mergekit; DARE at density 1 (its draws come from torch's global RNG, which our per-tensor
# seeded draws cannot match); gradients and filters on the per-model and top-level parameters
CASES = {
    "linear": """
merge_method: linear
dtype: torch.float32
models:
  - {model: ft1, parameters: {weight: 2e-1}}  # YAML 1.1 reads 2e-1 as text: a number all the same
  - {model: ft2, parameters: {weight: 0.5}}
  - {model: ft3, parameters: {weight: [0.1, 0.9]}}
""",
    "linear_unnormalized_with_base": """
merge_method: linear
base_model: base
models:
  - {model: ft1, parameters: {weight: 0.6}}
  - {model: ft2, parameters: {weight: [{filter: mlp, value: 0.1}, {value: 0.3}]}}
parameters: {weight: 0.25, normalize: false}
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: base
models:
  - {model: ft1, parameters: {weight: 0.7}}
  - {model: ft2, parameters: {weight: -0.3}}
  - {model: ft3, parameters: {weight: [1.0, 0.2, 0.5]}}
parameters: {lambda: 0.8}
""",
    "task_arithmetic_normalized": """
merge_method: task_arithmetic
base_model: base
models: [{model: base}, {model: ft1, parameters: {weight: 2.0}}, {model: ft2, parameters: {weight: 1.0}}]
parameters: {normalize: true}
""",
    "ties": """
merge_method: ties
base_model: base
models:
  - {model: ft1, parameters: {weight: 0.7, density: 0.5}}
  - {model: ft2, parameters: {weight: 0.3, density: [0.2, 0.9]}}
  - {model: ft3, parameters: {weight: 0.5, density: [{filter: self_attn, value: 0.1}, {value: 0.6}]}}
parameters: {lambda: 1.2, int8_mask: true}
""",
    "ties_unnormalized": """
merge_method: ties
base_model: base
models:
  - {model: ft1, parameters: {weight: 1.0}}
  - {model: ft2, parameters: {weight: -0.5}}
parameters: {density: 0.4, normalize: false}
""",
    "dare_linear": """
merge_method: dare_linear
base_model: base
models:
  - {model: ft1, parameters: {weight: 0.6, density: 1.0}}
  - {model: ft2, parameters: {weight: 0.4}}
parameters: {lambda: 0.9}
""",
    "dare_ties": """
merge_method: dare_ties
base_model: base
models:
  - {model: ft1, parameters: {weight: 0.6}}
  - {model: ft2, parameters: {weight: 0.4}}
  - {model: ft3, parameters: {weight: 0.8}}
parameters: {density: 1.0, normalize: true}
""",
    "model_stock": """
merge_method: model_stock
base_model: base
models: [{model: ft1}, {model: ft2}, {model: ft3}]
""",
    "model_stock_filter_wise": """
merge_method: model_stock
base_model: base
models: [{model: ft1}, {model: ft2}]
parameters: {filter_wise: true}
""",
    "slerp": """
merge_method: slerp
base_model: base
models: [{model: base}, {model: other}]
parameters:
  t:
    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
    - {value: 0.4}
""",
    "slerp_near_colinear": """
merge_method: slerp
base_model: base
models: [{model: ft1}]
parameters: {t: 0.3}
""",
}


def with_paths(text: str, models: dict[str, Path]) -> str:
    return re.sub(r"\b(base|ft1_copy|ft\d|other)\b", lambda m: str(models[m.group(1)]), text)


@pytest.mark.parametrize("case", list(CASES))
def test_each_method_equals_mergekit(case, models, tmp_path):
    text = with_paths(CASES[case], models)
    merged = ours(text, tmp_path)
    reference = mergekit(text, tmp_path)
    assert_same(merged, reference)
    base = weights(models["base"])
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # a merge that copied the base would pass nothing


# the merge reads the saved files, so it is the same for every family; mergekit plans these from its own
# architecture definitions (mamba2: inferred from the names), a tied head included
FAMILIES = {
    "llama-tied": dict(tie_embeddings=True),
    "qwen2": dict(family="qwen2", qkv_bias=True),
    "gpt2": dict(
        family="gpt2", n_kv_heads=4, norm="layernorm", mlp="plain", positions="learned", activation="gelu_tanh",
        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
    ),
    "mamba2": dict(family="mamba2", mixer="mamba2", mlp="none", n_heads=1, n_kv_heads=1, ssm_head_dim=16),
}  # fmt: skip


def family_dirs(root: Path, changes: dict) -> list[Path]:
    """A base and two perturbed copies of one family's tiny model (no tokenizer: not needed to merge)."""
    from slmkit.config import ModelConfig
    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model

    config = ModelConfig(**{**TINY, "vocab_size": 96, **changes})
    dirs = []
    for i in range(3):
        model = build_model(config)
        model.init_weights(seed=0)
        gen = torch.Generator().manual_seed(i)  # one stream: tensors of one shape get different noise (no ties)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01 * min(i, 1))
        dirs.append(save_model(model, root / f"m{i}"))
    return dirs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_other_families_equal_mergekit(family, tmp_path):
    base, ft1, ft2 = family_dirs(tmp_path, FAMILIES[family])
    text = f"""
merge_method: ties
base_model: {base}
models:
  - {{model: {ft1}, parameters: {{weight: 0.7, density: 0.5}}}}
  - {{model: {ft2}, parameters: {{weight: 0.3, density: [0.2, 0.9]}}}}
"""
    merged = ours(text, tmp_path)
    assert_same(merged, mergekit(text, tmp_path))
    if family == "llama-tied":
        assert "lm_head.weight" not in merged


def test_slmkit_native_family_merges(tmp_path):
    """mergekit cannot read slmkit's own format (no transformers class): the linear merge against the average."""
    from slmkit.interop.checkpoint import load_model

    dirs = family_dirs(tmp_path, dict(family="slmkit", layer_pattern=("attention", "gla", "based")))
    models = "".join(f"  - {{model: {d}, parameters: {{weight: {w}}}}}\n" for d, w in zip(dirs, (1, 2, 1), strict=True))
    merged = ours(f"merge_method: linear\nmodels:\n{models}", tmp_path)
    states = [weights(d) for d in dirs]
    assert_same(merged, {k: (states[0][k] + 2 * states[1][k] + states[2][k]) / 4 for k in states[0]}, atol=1e-6)
    assert load_model(tmp_path / "ours").config.layer_pattern == ("attention", "gla", "based")


def test_merged_model_loads_in_transformers_and_slmkit(models, tmp_path):
    from transformers import AutoModelForCausalLM

    from slmkit.interop.checkpoint import load_model

    merged = ours(with_paths(CASES["ties"], models), tmp_path)
    out = tmp_path / "ours"
    assert {"config.json", "model.safetensors", "tokenizer.json", "mergekit_config.yml"} <= {
        p.name for p in out.iterdir()
    }
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(hf.model.layers[1].mlp.up_proj.weight, merged["model.layers.1.mlp.up_proj.weight"])
    tokens = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=tokens).logits, load_model(out)(tokens), atol=1e-4)


def test_bfloat16_output(models, tmp_path):
    text = with_paths(CASES["task_arithmetic"], models)
    full = ours(text, tmp_path, "full")
    half = ours(text + "dtype: bfloat16\n", tmp_path, "half")
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert json.loads((tmp_path / "half" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, tensor in full.items():  # inputs rounded to bf16 first, then the result: a few bf16 steps apart
        assert torch.allclose(half[name].float(), tensor, atol=tensor.abs().max().item() * 2**-6, rtol=0), name
        assert not torch.equal(half[name].float(), tensor), name


def test_merging_one_model_returns_it(models, tmp_path):
    text = f"merge_method: linear\nmodels: [{{model: {models['ft2']}, parameters: {{weight: 0.3}}}}]\n"
    merged = ours(text, tmp_path)
    assert_same(merged, weights(models["ft2"]), atol=1e-6)


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_ties_of_identical_models_returns_the_model(density, models, tmp_path):
    text = f"""
merge_method: ties
base_model: {models["base"]}
models:
  - {{model: {models["ft1"]}, parameters: {{weight: 0.3, density: {density}}}}}
  - {{model: {models["ft1_copy"]}, parameters: {{weight: 0.7, density: {density}}}}}
"""
    merged, ft1, base = ours(text, tmp_path), weights(models["ft1"]), weights(models["base"])
    if density == 1.0:
        assert_same(merged, ft1, atol=1e-6)
        return
    # trimmed: each entry is the model's (kept by both copies) or the base's; half of them the model's
    for name, tensor in merged.items():
        is_model = torch.isclose(tensor, ft1[name], atol=1e-6)
        assert (is_model | torch.isclose(tensor, base[name], atol=1e-6)).all(), name
        if tensor.numel() > 100:
            assert abs(is_model.float().mean().item() - 0.5) < 0.02, name


@pytest.mark.parametrize("t,endpoint", [(0, "base"), (1, "other")])
def test_slerp_endpoints(t, endpoint, models, tmp_path):
    text = f"merge_method: slerp\nbase_model: {models['base']}\nmodels: [{{model: {models['other']}}}]\n"
    merged = ours(text + f"parameters: {{t: {t}}}\n", tmp_path)
    assert_same(merged, weights(models[endpoint]), atol=1e-6)


def test_slerp_keeps_the_norm_of_orthogonal_tensors():
    from slmkit.merge.methods import slerp

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 64, generator=gen), torch.randn(64, 64, generator=gen)
    b = b / b.norm() * a.norm()
    mid = slerp(0.5, a, b)
    assert abs(mid.norm() / a.norm() - 1) < 0.02  # on the sphere; lerp would shrink it by about cos(45 deg)
    assert ((a + b) / 2).norm() / a.norm() < 0.75


def test_dare_drop_keeps_density_rescales_exactly_and_is_seeded():
    from slmkit.merge.methods import drop

    delta = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    for density in (0.1, 0.5, 0.9):
        dropped = drop(delta, density, torch.Generator().manual_seed(3))
        kept = dropped != 0
        assert abs(kept.float().mean().item() - density) < 0.005
        assert torch.equal(dropped[kept], delta[kept] / density)  # exactly 1/density, not an estimate of it
        assert torch.equal(dropped, drop(delta, density, torch.Generator().manual_seed(3)))
        assert not torch.equal(dropped, drop(delta, density, torch.Generator().manual_seed(4)))
    plain = drop(delta, 0.5, torch.Generator().manual_seed(3), rescale=False)
    assert torch.equal(plain[plain != 0], delta[plain != 0])
    assert torch.equal(drop(delta, 1.0, torch.Generator()), delta)


def test_dare_merge_is_reproducible_per_seed(models, tmp_path):
    text = f"""
merge_method: dare_linear
base_model: {models["base"]}
models: [{{model: {models["ft1"]}, parameters: {{weight: 1.0, density: 0.5}}}}]
"""
    a, b = ours(text, tmp_path, "a", seed=1), ours(text, tmp_path, "b", seed=1)
    c = ours(text, tmp_path, "c", seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    base, ft1 = weights(models["base"]), weights(models["ft1"])
    name = "model.layers.0.mlp.up_proj.weight"
    rescaled = base[name] + 2 * (ft1[name] - base[name])
    is_kept = torch.isclose(a[name], rescaled, atol=1e-6)
    assert (is_kept | torch.isclose(a[name], base[name], atol=1e-6)).all()
    assert abs(is_kept.float().mean().item() - 0.5) < 0.05


def test_layer_gradient_positions():
    from slmkit.merge.run import layer_position
    from slmkit.merge.spec import evaluate

    assert [layer_position(f"model.layers.{i}.mlp.up_proj.weight", 5) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert layer_position("model.embed_tokens.weight", 5) == layer_position("lm_head.weight", 5) == 0
    assert evaluate([0.0, 1.0, 0.0], "x", 0.25) == 0.5
    assert evaluate([{"filter": "mlp", "value": 3}, {"value": 1}], "model.layers.0.mlp.up_proj.weight", 0) == 3
    assert evaluate([{"filter": "mlp", "value": 3}], "model.norm.weight", 0) is None


def test_mergekit_pin_is_admitted_by_the_dev_extra():
    from packaging.requirements import Requirement

    root = SRC.parent
    dev = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    [spec] = [Requirement(s) for s in dev if Requirement(s).name == "mergekit"]
    pin = re.search(r"^MERGEKIT_VERSION\s*:=\s*(\S+)", (root / "Makefile").read_text(), re.MULTILINE).group(1)
    assert spec.specifier.contains(pin)


# ---- bad input: one `error:` line, exit 2 ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    found = {
        "vocab": make_dir(root / "vocab", data_dir, seed=1, vocab_size=600),
        "shape": make_dir(root / "shape", data_dir, seed=1, d_ff=96),
        "layers": make_dir(root / "layers", data_dir, seed=1, n_layers=2),
        "family": make_dir(root / "family", data_dir, seed=1, family="mistral", sliding_window=32),
        "empty": root / "empty",
    }
    found["empty"].mkdir()
    (found["empty"] / "notes.txt").write_text("not a model")
    return found


def cli_error(args: list[str], capsys) -> str:
    from slmkit.cli import run

    code = run(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


BAD = {
    "unknown method": ("merge_method: frankenmerge\nmodels: [{model: ft1}]\n", "choose one of: linear, task_arith"),
    "no base": ("merge_method: ties\nmodels: [{model: ft1, parameters: {weight: 1}}]\n", "needs a `base_model`"),
    "not a model dir": ("merge_method: linear\nmodels: [{model: EMPTY}]\n", "models[0]"),
    "missing path": ("merge_method: linear\nmodels: [{model: /no/such/model}]\n", "no such model"),
    "density 0": (
        "merge_method: ties\nbase_model: base\nmodels: [{model: ft1, parameters: {weight: 1, density: 0}}]\n",
        "`density` must be in (0, 1]",
    ),
    "density above 1": (
        "merge_method: dare_ties\nbase_model: base\nmodels: [{model: ft1, parameters: {weight: 1}}]\n"
        "parameters: {density: [0.5, 1.5]}\n",
        "`density` must be in (0, 1]",
    ),
    "slerp of 3": (
        "merge_method: slerp\nbase_model: base\nmodels: [{model: ft1}, {model: ft2}]\nparameters: {t: 0.5}\n",
        "exactly 2 models",
    ),
    "unknown top-level parameter": (
        "merge_method: ties\nbase_model: base\nmodels: [{model: ft1}]\nparameters: {weight: 1, densty: 0.5}\n",
        "unknown parameter `densty`",
    ),
    "unknown per-model parameter": (
        "merge_method: model_stock\nbase_model: base\nmodels: [{model: ft1, parameters: {weight: 1}}, {model: ft2}]\n",
        "unknown parameter `weight`",
    ),
    "shared parameter per model": (
        "merge_method: slerp\nbase_model: base\nmodels: [{model: ft1, parameters: {t: 0.5}}]\n",
        "top-level `parameters:`",
    ),
    "missing weight": ("merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: ft1}]\n", "no `weight`"),
    "model stock of one": ("merge_method: model_stock\nbase_model: base\nmodels: [{model: ft1}]\n", "at least 2"),
    "vocabularies": (
        "merge_method: linear\nparameters: {weight: 1}\nmodels: [{model: ft1}, {model: VOCAB}]\n",
        "different vocabularies",
    ),
    "shapes": (
        "merge_method: linear\nparameters: {weight: 1}\nmodels: [{model: base}, {model: SHAPE}]\n",
        "model.layers.0.mlp.down_proj.weight is (32, 64)",
    ),
    "layers": (
        "merge_method: slerp\nbase_model: base\nmodels: [{model: LAYERS}]\nparameters: {t: 0.5}\n",
        "lacks model.layers.2.",
    ),
    "family": (
        "merge_method: slerp\nbase_model: base\nmodels: [{model: FAMILY}]\nparameters: {t: 0.5}\n",
        "is llama, ",
    ),
    "text weight": ("merge_method: linear\nmodels: [{model: ft1, parameters: {weight: heavy}}]\n", "must be a number"),
    "text normalize": (
        "merge_method: linear\nmodels: [{model: ft1, parameters: {weight: 1}}]\nparameters: {normalize: 1}\n",
        "true or false",
    ),
    "dtype": ("merge_method: linear\nmodels: [{model: ft1, parameters: {weight: 1}}]\ndtype: int8\n", "float32"),
    "slices": ("merge_method: linear\nslices: []\n", "not supported"),
    "unknown key": ("merge_method: linear\nmodels: [{model: ft1}]\nmodel: x\n", "unknown key `model`"),
    "yaml": ("merge_method: [linear\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line(case, models, odd_models, tmp_path, capsys):
    text, expected = BAD[case]
    text = with_paths(text, models)
    for key in ("vocab", "shape", "layers", "family", "empty"):
        text = text.replace(key.upper(), str(odd_models[key]))
    config = tmp_path / "merge.yaml"
    config.write_text(text)
    err = cli_error(["merge", str(config), "--out", str(tmp_path / "out")], capsys)
    assert expected in err, err
    assert not (tmp_path / "out").exists()


def test_shape_error_names_both_shapes(models, odd_models, tmp_path, capsys):
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {models['base']}\n"
        f"models: [{{model: {odd_models['shape']}, parameters: {{weight: 1}}}}]\n"
    )
    err = cli_error(["merge", str(config), "--out", str(tmp_path / "out")], capsys)
    assert "(32, 64)" in err and "(32, 96)" in err and str(odd_models["shape"]) in err, err


def test_existing_output_and_compressed_inputs_are_refused(models, tmp_path, capsys):
    from slmkit.compress.pipeline import compress

    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: linear\nmodels: [{{model: {models['ft1']}, parameters: {{weight: 1}}}}]\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists" in cli_error(["merge", str(config), "--out", str(out)], capsys)
    assert (out / "keep.txt").read_text() == "mine"
    for inside in (models["ft1"], models["ft1"].parent):
        err = cli_error(["merge", str(config), "--out", str(inside), "--overwrite"], capsys)
        assert "is or holds a merged model" in err, err

    compress(models["ft1"], "int8", tmp_path / "int8", measure=False)
    config.write_text(f"merge_method: linear\nmodels: [{{model: {tmp_path / 'int8'}, parameters: {{weight: 1}}}}]\n")
    assert "compressed" in cli_error(["merge", str(config), "--out", str(tmp_path / "out2")], capsys)
    with pytest.raises(UserError, match="merge config not found"):
        from slmkit.api import merge

        merge(tmp_path / "absent.yaml", tmp_path / "out3")


def test_cli_prints_one_summary_line(models, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(with_paths(CASES["ties"], models))
    result = run_slm("merge", config, "--out", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.strip().splitlines()
    assert "with ties" in line and str(tmp_path / "merged") in line and "3 model(s)" in line, line
    bad = run_slm("merge", config, "--out", tmp_path / "merged")  # now non-empty
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_sharded_and_corrupt_inputs(models, tmp_path, capsys):
    from slmkit.interop.checkpoint import load_model, save_model

    sharded = save_model(load_model(models["ft1"]), tmp_path / "sharded", models["ft1"], max_shard_bytes=20_000)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    pair = "merge_method: linear\nparameters: {{weight: 1}}\nmodels: [{{model: {}}}, {{model: {}}}]\n"
    assert_same(
        ours(pair.format(sharded, models["ft2"]), tmp_path, "a"),
        ours(pair.format(models["ft1"], models["ft2"]), tmp_path, "b"),
        atol=0,
    )
    corrupt = tmp_path / "corrupt"
    shutil.copytree(models["ft2"], corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    config = tmp_path / "merge.yaml"
    config.write_text(pair.format(models["ft1"], corrupt))
    assert "not a readable safetensors file" in cli_error(["merge", str(config), "--out", str(tmp_path / "c")], capsys)
