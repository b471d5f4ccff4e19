"""The recall benchmark's memory accounting (benchmarks/mixers.py): what "equal state size" compares."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
mixers = pytest.importorskip("mixers")


def test_attention_memory_is_its_keys_and_values():
    state = mixers._recall_model("micro", 8, 64, {}).new_state(1, 32)
    # 2 layers x (keys + values) x 2 kv heads x 32 positions x 16 channels x 4 bytes
    assert mixers.memory_bytes(state) == 2 * 2 * 2 * 32 * 16 * 4


def test_recurrent_memory_counts_the_carry_not_the_rewind_copies():
    model = mixers._recall_model("micro-mamba2", 8, 64, {"ssm_state_size": 8})
    state = model.new_state(1, 32)
    inner = 2 * 64
    conv = (inner + 2 * 8) * 3  # conv window: kernel - 1 inputs of x, B and C
    ssm = (inner // 32) * 32 * 8  # heads x head width x state size
    assert mixers.memory_bytes(state) == 2 * (conv + ssm) * 4
    assert mixers.state_bytes(state) > 3 * mixers.memory_bytes(state)  # prev_*, ck_* and the ring are allocated


def test_based_window_counts_only_the_positions_it_attends_to():
    a = mixers._recall_model("micro-based", 8, 64, {"linear_feature_dim": 2, "linear_window": 4})
    b = mixers._recall_model("micro-based", 8, 64, {"linear_feature_dim": 2, "linear_window": 8})
    ma = mixers.memory_bytes(a.new_state(1, 32), 4)
    mb = mixers.memory_bytes(b.new_state(1, 32), 8)
    assert mb - ma == 2 * 2 * 2 * 4 * 16 * 4  # 4 more positions of keys and values, 2 kv heads, 2 layers


@pytest.mark.parametrize("name", ["micro-mamba2", "micro-based", "micro-gla", "micro-hybrid"])
def test_fit_memory_takes_the_largest_setting_under_the_target(name):
    target = mixers.memory_bytes(mixers._recall_model("micro", 8, 64, {}).new_state(1, 32))
    fitted = mixers.fit_memory(name, 8, 64, {}, target)
    model = mixers._recall_model(name, 8, 64, fitted)
    size = mixers.memory_bytes(model.new_state(1, 32), model.config.linear_window)
    assert size <= target
    # the next value of the first knob (alone) no longer fits, or there is none
    knob = next(iter(fitted))
    kinds = {"micro-gla": "gla", "micro-based": "based"}.get(name, "mamba2")
    values = mixers.MEMORY_KNOBS[kinds][knob]
    i = values.index(fitted[knob])
    if knob == "n_heads":  # fewer heads, more memory
        assert i == 0 or size == target
        return
    if i + 1 < len(values):
        bigger = mixers._recall_model(name, 8, 64, fitted | {knob: values[i + 1]})
        assert mixers.memory_bytes(bigger.new_state(1, 32), bigger.config.linear_window) > target


def test_fit_memory_refuses_a_target_nothing_fits():
    with pytest.raises(SystemExit, match="error: no setting"):
        mixers.fit_memory("micro-mamba2", 8, 64, {}, 100)


def test_quality_arms_run_per_seed_with_the_train_overrides(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    words = "the model reads the text and predicts the next token of the corpus".split()
    corpus.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 40)
    results = mixers.quality_section(
        ["tiny"], [str(corpus)], 2e8, 300, tmp_path / "work", "float32", (1, 2), {"embed_lr_scale": 10.0}
    )
    assert [r["seed"] for r in results] == [1, 2]
    assert results[0]["bits_per_byte"] != results[1]["bits_per_byte"]  # another init and data order
    for seed in (1, 2):
        trained = json.loads(
            (tmp_path / "work" / f"run-{abs(hash(str(corpus)))}-tiny-{seed}" / "train_config.json").read_text()
        )
        assert trained["embed_lr_scale"] == 10.0 and trained["seed"] == seed
    assert "mean of 2" in capsys.readouterr().out
