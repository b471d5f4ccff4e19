import pytest

from slmkit.config import PRESETS, ModelConfig, preset
from slmkit.errors import UserError
from slmkit.interop.hf import config_from_hf, config_to_hf


def test_presets_span_half_million_to_124m():
    counts = {name: preset(name).num_params() for name in PRESETS}
    assert 0.3e6 <= counts["tiny"] <= 0.8e6
    assert 115e6 <= counts["124m"] <= 135e6
    ladder = [n for n in counts if "-" not in n]  # the transformer ladder grows; mixer variants sit beside it
    assert [counts[n] for n in ladder] == sorted(counts[n] for n in ladder)
    for name in set(counts) - set(ladder):  # micro-mamba2, small-hybrid, ...: about the size of their base
        active = preset(name).num_params(active=True)  # a mixture of experts: the size a token uses
        assert 0.85 <= active / counts[name.split("-")[0]] <= 1.15, name


def test_num_params_matches_module():
    from slmkit.models import build_model

    for tie in (True, False):
        cfg = preset("tiny", vocab_size=300, tie_embeddings=tie)
        model = build_model(cfg)
        assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_flops_per_token_is_about_6n_plus_attention():
    cfg = preset("small", vocab_size=8192)
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model
    attention = 12 * cfg.n_layers * cfg.max_seq_len * cfg.d_model
    assert cfg.flops_per_token() == pytest.approx(6 * n + attention, rel=0.01)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_heads": 6, "n_kv_heads": 4}, "multiple of n_kv_heads"),
        ({"d_model": 100, "n_heads": 3, "n_kv_heads": 3}, "divisible by n_heads"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"eos_token_id": 10_000}, "outside the vocabulary"),
        ({"norm_eps": 0}, "norm_eps"),
    ],
)
def test_invalid_config_values(changes, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**{**PRESETS["tiny"], **changes})


def test_unknown_preset_and_field():
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(UserError, match="unknown model config field"):
        preset("tiny", widht=3)


def test_hf_dict_round_trip():
    cfg = preset("micro", vocab_size=1000, tie_embeddings=False)
    assert config_from_hf(config_to_hf(cfg)) == cfg


def test_unsupported_hf_config_is_refused():
    d = config_to_hf(preset("tiny"))
    with pytest.raises(UserError, match="model_type 'gpt_neox' is not supported"):
        config_from_hf({**d, "model_type": "gpt_neox"})
    # attention_bias is supported since the interop issue, yarn and longrope since issue #20; proportional is not
    with pytest.raises(UserError, match="rope scaling type 'proportional'"):
        config_from_hf({**d, "rope_parameters": {"rope_type": "proportional", "factor": 4.0}})


# ---- wrongly typed values and absurd shapes (issue #15) ---------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"d_model": "64"}, "d_model must be an integer, got '64'"),
        ({"n_layers": True}, "n_layers must be an integer, got True"),
        ({"rope_theta": float("nan")}, "rope_theta must be a finite number"),
        ({"norm_eps": float("inf")}, "norm_eps must be a finite number"),
        ({"tie_embeddings": 1}, "tie_embeddings must be true or false"),
        ({"mixer": 3}, "mixer must be a string"),
        ({"max_seq_len": 2**40}, r"max_seq_len=1,099,511,627,776 is beyond the limit of 1,048,576"),
        ({"n_layers": 100_000}, "n_layers=100,000 is beyond the limit of 1,024"),
        ({"vocab_size": 2**30}, "vocab_size=.* is beyond the limit"),
        ({"d_model": 2**16, "d_ff": 2**17, "n_layers": 1024, "n_heads": 64, "n_kv_heads": 64}, "parameters is beyond"),
    ],
)
def test_wrong_types_and_absurd_shapes_name_the_field(changes, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**{**PRESETS["tiny"], **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seed": "abc"}, "seed must be an integer, got 'abc'"),
        ({"warmup_steps": float("nan")}, "warmup_steps must be an integer, got nan"),
        ({"max_steps": float("inf")}, "max_steps must be an integer, got inf"),
        ({"batch_size": True}, "batch_size must be an integer, got True"),
        ({"lr": "fast"}, "lr must be a finite number, got 'fast'"),
        ({"max_minutes": float("inf")}, "max_minutes must be a finite number"),
        ({"compile": "yes"}, "compile must be true or false"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda, cuda:N or mps"),
        ({"model": ["n_layers", 2]}, "model must be a mapping"),
        ({"model": {"n_layers": 5000}}, "n_layers=5,000 is beyond the limit of 1,024"),
    ],
)
def test_train_config_wrong_types_name_the_field(changes, message):
    from slmkit.train.config import TrainConfig

    with pytest.raises(UserError, match=message):
        TrainConfig(**changes)


def test_yaml_config_values_are_checked_with_the_file_named(tmp_path):
    from slmkit.train.config import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text('max_steps: 10\nseed: "abc"\n')
    with pytest.raises(UserError, match=rf"{path}: train config: seed must be an integer"):
        TrainConfig.from_yaml(path)
    path.write_text("max_steps: 10\nwarmup_steps: .nan\n")
    with pytest.raises(UserError, match="warmup_steps must be an integer, got nan"):
        TrainConfig.from_yaml(path)
    path.write_text("max_flops: 1e18\n")  # YAML 1.1 reads 1e18 as a string; a float field takes it
    assert TrainConfig.from_yaml(path).max_flops == 1e18


def test_corrupt_saved_configs_name_their_file(tmp_path):
    from slmkit.interop.hf import load_config, save_config
    from slmkit.train.config import TrainConfig

    saved = tmp_path / "train_config.json"
    saved.write_bytes(b"\x00\x9f not json")
    with pytest.raises(UserError, match=rf"{saved}: cannot read it as JSON"):
        TrainConfig.load(saved)
    saved.write_text('{"seq_len": "long"}')
    with pytest.raises(UserError, match=rf"{saved}: train config: seq_len must be an integer"):
        TrainConfig.load(saved)
    config = tmp_path / "config.json"
    save_config(preset("tiny"), config)
    good = config.read_text()
    config.write_text(good.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": [1]'))
    with pytest.raises(UserError, match=rf"{config}: a value has the wrong type"):
        load_config(config)
    config.write_text(good.replace('"max_position_embeddings": 256', '"max_position_embeddings": 1099511627776'))
    with pytest.raises(UserError, match=rf"{config}: model config: max_seq_len=.* beyond the limit"):
        load_config(config)
