"""Adapters on slmkit models (slmkit.models.lora): keys kept, merge formula, rsLoRA, NOLA, QLoRA on int8/int4
bases, several adapters chosen per batch row. Parity with peft itself: tests/interop/test_adapters.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import UserError
from slmkit.models import build_model
from slmkit.models.lora import (
    LoRASpec,
    adapted_modules,
    adapter_names,
    adapter_state_dict,
    add_adapters,
    base_state_dict,
    is_adapter_param,
    merge_adapters,
    remove_adapters,
    set_active_adapters,
    trainable_parameter_count,
)

VOCAB = 96


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**overrides) -> torch.nn.Module:
    fields = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
    model = build_model(ModelConfig(**(fields | overrides)))
    model.init_weights(seed=0)
    return model.eval()


def randomize(model: torch.nn.Module, seed: int = 1, names: list[str] | None = None) -> None:
    """Non-zero B (and new A) so the update is visible (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if is_adapter_param(key) and (names is None or key.split(".")[-2] in names):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def tokens(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the spec -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, needle",
    [
        (dict(r=0), "r (the rank)"),
        (dict(r=2.5), "r must be an integer"),
        (dict(alpha=0), "alpha must be positive"),
        (dict(dropout=1.0), "dropout"),
        (dict(kind="dora"), "kind"),
        (dict(kind="nola", nola_bases=0), "nola_bases"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules="q_proj,,v_proj"), "target_modules"),
        (dict(use_rslora="yes"), "use_rslora"),
    ],
)
def test_spec_refuses_bad_values(fields, needle):
    with pytest.raises(UserError, match="adapter spec") as info:
        LoRASpec(**fields)
    assert needle in str(info.value)


def test_spec_scale_and_targets():
    assert LoRASpec(r=4, alpha=8).scale == 2.0
    assert LoRASpec(r=4, alpha=8, use_rslora=True).scale == 4.0  # alpha / sqrt(r)
    assert LoRASpec(target_modules="q_proj, v_proj").target_modules == ("q_proj", "v_proj")
    assert LoRASpec(target_modules=["o_proj"]).target_modules == ("o_proj",)


# ---- adding and removing --------------------------------------------------------------------------
def test_adapting_keeps_the_base_keys_and_starts_at_the_base():
    model = tiny()
    before_keys = list(model.state_dict())
    idx = tokens()
    with torch.no_grad():
        base = model(idx)
    layers = add_adapters(model, LoRASpec(r=4, target_modules=("q_proj", "v_proj")))
    assert layers == [f"layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    assert [k for k in model.state_dict() if not is_adapter_param(k)] == before_keys
    assert set(adapter_state_dict(model)) == {f"{n}.lora_{p}.default.weight" for n in layers for p in "AB"}
    with torch.no_grad():
        assert torch.equal(model(idx), base)  # B = 0: the adapted model starts equal to the base
    randomize(model)
    plain = tiny()
    plain.load_state_dict(base_state_dict(model))  # strict: the base's keys, nothing else
    with torch.no_grad():
        assert torch.equal(plain(idx), base)
        assert not torch.allclose(model(idx), base)
    remove_adapters(model)
    assert list(model.state_dict()) == before_keys and adapter_names(model) == []
    with torch.no_grad():
        assert torch.equal(model(idx), base)


def test_all_linear_is_every_linear_but_the_head():
    model = tiny()
    layers = add_adapters(model, LoRASpec(r=2, target_modules="all-linear"))
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    per_layer += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert layers == [f"layers.{i}.{n}" for i in range(2) for n in per_layer]
    # a full name picks one layer; lm_head only when named
    other = tiny()
    assert add_adapters(other, LoRASpec(target_modules=("layers.1.mlp.down_proj", "lm_head"))) == [
        "layers.1.mlp.down_proj",
        "lm_head",
    ]


@pytest.mark.parametrize(
    "targets, needle",
    [(("q_proj", "w9"), "'w9' matches no layer"), (("embed_tokens",), "linear layers only"), (("mlp",), "MLP")],
)
def test_targets_that_match_nothing_linear_are_refused(targets, needle):
    model = tiny()
    with pytest.raises(UserError, match=needle):
        add_adapters(model, LoRASpec(target_modules=targets))
    assert adapted_modules(model) == []


def test_adapter_names_are_checked():
    model = tiny()
    add_adapters(model, LoRASpec(), name="chat")
    with pytest.raises(UserError, match="already has an adapter named 'chat'"):
        add_adapters(model, LoRASpec(), name="chat")
    with pytest.raises(UserError, match="without dots"):
        add_adapters(model, LoRASpec(), name="a.b")
    with pytest.raises(UserError, match="no adapter 'other'"):
        merge_adapters(model, ["other"])


def test_only_adapter_parameters_train():
    model = tiny()
    add_adapters(model, LoRASpec(r=4, dropout=0.1, target_modules="all-linear"))
    randomize(model)
    model.train()
    model.loss(tokens(), tokens(seed=1)).backward()
    grads = {k for k, p in model.named_parameters() if p.grad is not None}
    assert grads and all(is_adapter_param(k) for k in grads)
    assert grads == {k for k in adapter_state_dict(model)}
    assert trainable_parameter_count(model) == sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- merging ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
def test_merged_weight_is_w_plus_scaled_b_a(rslora):
    model = tiny()
    spec = LoRASpec(r=4, alpha=12, use_rslora=rslora, target_modules=("q_proj", "down_proj"))
    layers = add_adapters(model, spec)
    randomize(model)
    idx = tokens()
    with torch.no_grad():
        adapted = model(idx)
    scale = 12 / (math.sqrt(4) if rslora else 4)
    expected = {}
    for name in layers:
        module = model.get_submodule(name)
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        expected[name] = module.weight.detach() + scale * (b @ a).detach()
    assert merge_adapters(model) == layers
    assert adapted_modules(model) == [] and not any(is_adapter_param(k) for k in model.state_dict())
    for name in layers:
        torch.testing.assert_close(model.get_submodule(name).weight, expected[name], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), adapted, rtol=0, atol=1e-5)


def test_tied_head_adapter_is_not_merged():
    model = tiny(tie_embeddings=True)
    add_adapters(model, LoRASpec(target_modules=("lm_head",)))
    with pytest.raises(UserError, match="tied"):
        merge_adapters(model)
    assert adapted_modules(model) == ["lm_head"]  # nothing changed


# ---- NOLA -------------------------------------------------------------------------------------------
def test_nola_trainable_count_is_independent_of_rank():
    counts = {}
    for r in (1, 4, 16):
        model = tiny()
        layers = add_adapters(model, LoRASpec(r=r, kind="nola", nola_bases=10, target_modules="all-linear"))
        counts[r] = trainable_parameter_count(model)
        assert counts[r] == len(layers) * 2 * 10
    assert len(set(counts.values())) == 1
    lora = tiny()
    add_adapters(lora, LoRASpec(r=4, target_modules="all-linear"))
    assert trainable_parameter_count(lora) > counts[4]  # and far below LoRA's at the same rank
    assert not any("bases" in k for k in tiny().state_dict())


def test_nola_regenerates_its_update_bit_for_bit():
    spec = LoRASpec(r=4, alpha=8, kind="nola", nola_bases=6, nola_seed=7, target_modules=("q_proj", "v_proj"))
    model = tiny()
    layers = add_adapters(model, spec)
    randomize(model)
    idx = tokens()
    with torch.no_grad():
        out = model(idx)
    coefficients = adapter_state_dict(model)
    assert set(coefficients) == {f"{n}.lora_{p}.default.coefficients" for n in layers for p in "AB"}
    updates = {n: (model.get_submodule(n).lora_B["default"].weight @ model.get_submodule(n).lora_A["default"].weight)
               for n in layers}  # fmt: skip
    # a fresh model regenerates the bases from the seed; with the stored coefficients the update is identical
    again = tiny()
    add_adapters(again, spec)
    again.load_state_dict(coefficients, strict=False)
    for n in layers:
        module = again.get_submodule(n)
        assert torch.equal(module.lora_A["default"].bases, module.lora_A["default"].regenerate())
        assert torch.equal(module.lora_B["default"].weight @ module.lora_A["default"].weight, updates[n])
    with torch.no_grad():
        assert torch.equal(again(idx), out)
    # another seed: other bases (so the equality above is not trivial)
    other = tiny()
    add_adapters(other, LoRASpec(**{**spec.__dict__, "nola_seed": 8}))
    first = other.get_submodule(layers[0]).lora_A["default"].bases
    assert not torch.equal(first, model.get_submodule(layers[0]).lora_A["default"].bases)


def test_nola_gradients_reach_only_coefficients():
    model = tiny()
    add_adapters(model, LoRASpec(r=8, kind="nola", nola_bases=4))
    randomize(model)
    model.train()
    model.loss(tokens(), tokens(seed=1)).backward()
    grads = {k for k, p in model.named_parameters() if p.grad is not None}
    assert grads and all(k.endswith(".coefficients") for k in grads)


# ---- QLoRA ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compressed_dirs(tmp_path_factory):
    from slmkit.compress.pipeline import CompressOptions, compress
    from slmkit.interop.checkpoint import save_model

    root = tmp_path_factory.mktemp("qlora")
    save_model(tiny(), root / "float")
    torch.set_num_threads(1)
    out = {}
    for method in ("int8", "int4"):
        compress(root / "float", method, root / method, options=CompressOptions(group_size=32), measure=False)
        out[method] = root / method
    return out


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_qlora_is_the_compressed_base_plus_the_update(compressed_dirs, method):
    from slmkit.interop.checkpoint import load_model
    from slmkit.models.quantized import Int4Linear, Int8Linear

    model = load_model(compressed_dirs[method])
    layer = model.get_submodule("layers.0.mlp.down_proj")
    assert isinstance(layer, Int8Linear if method == "int8" else Int4Linear)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    idx = tokens()
    with torch.no_grad():
        base_layer, base_logits = layer(x), model(idx)
    spec = LoRASpec(r=4, alpha=8, target_modules="all-linear")
    add_adapters(model, spec)
    randomize(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base_layer + (x @ a.t() @ b.t()) * spec.scale, rtol=0, atol=1e-5)
        assert not torch.allclose(model(idx), base_logits)
    model.train()
    model.loss(idx, tokens(seed=1)).backward()
    grads = {k for k, p in model.named_parameters() if p.grad is not None}
    assert grads == set(adapter_state_dict(model))
    with pytest.raises(UserError, match="compressed layer"):
        merge_adapters(model)
    remove_adapters(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(idx), base_logits)


def test_qlora_state_dict_still_loads_into_the_compressed_model(compressed_dirs):
    from slmkit.interop.checkpoint import load_model

    model = load_model(compressed_dirs["int4"])
    add_adapters(model, LoRASpec(r=2, target_modules=("q_proj",)))
    randomize(model)
    copy_of = load_model(compressed_dirs["int4"])
    add_adapters(copy_of, LoRASpec(r=2, target_modules=("q_proj",)))
    copy_of.load_state_dict(model.state_dict())  # strict: adapter keys under a packed layer are the adapter's
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(copy_of(idx), model(idx))


# ---- several adapters, one per row ------------------------------------------------------------------
def two_adapters() -> torch.nn.Module:
    model = tiny()
    add_adapters(model, LoRASpec(r=4, alpha=8, target_modules=("q_proj", "v_proj")), name="a")
    add_adapters(model, LoRASpec(r=2, alpha=4, use_rslora=True, target_modules="all-linear"), name="b")
    randomize(model, seed=1, names=["a"])
    randomize(model, seed=2, names=["b"])
    return model


def merged_copy(model: torch.nn.Module, keep: str | None) -> torch.nn.Module:
    out = copy.deepcopy(model)
    remove_adapters(out, [n for n in adapter_names(out) if n != keep])
    if keep is not None:
        merge_adapters(out)
    return out


def test_each_row_uses_its_own_adapter():
    model = two_adapters()
    assert adapter_names(model) == ["a", "b"]
    idx = tokens(batch=4)
    rows = torch.tensor([0, 1, -1, 1])
    set_active_adapters(model, rows)
    with torch.no_grad():
        out = model(idx)
        again = model(idx)  # the stacked factors' cache gives the same
    assert torch.equal(out, again)
    refs = {keep: merged_copy(model, keep) for keep in ("a", "b", None)}
    for i, index in enumerate(rows.tolist()):
        ref = refs[None if index < 0 else "ab"[index]]
        with torch.no_grad():
            torch.testing.assert_close(out[i], ref(idx[i : i + 1])[0], rtol=0, atol=1e-5)
    assert not torch.allclose(out[1], out[2], atol=1e-3)  # the adapters do change the rows


def test_row_selection_with_one_adapter_equals_no_selection_and_decode_with_state():
    model = tiny()
    add_adapters(model, LoRASpec(r=4, target_modules="all-linear"))
    randomize(model)
    idx = tokens()
    with torch.no_grad():
        plain = model(idx)
        set_active_adapters(model, torch.tensor([0, 0]))
        torch.testing.assert_close(model(idx), plain, rtol=0, atol=1e-5)
        # prefill and one decode step through the inference state, rows picking adapter / none
        set_active_adapters(model, torch.tensor([0, -1]))
        state = model.new_state(2, 16)
        model(idx[:, :-1], state=state, pos=torch.arange(6))
        step = model(idx[:, -1:], state=state, pos=torch.tensor([6]))
        set_active_adapters(model, None)
        torch.testing.assert_close(step[0, 0], plain[0, -1], rtol=0, atol=1e-5)
        remove_adapters(model)
        torch.testing.assert_close(step[1, 0], model(idx)[1, -1], rtol=0, atol=1e-5)


def test_bad_row_selections_are_refused():
    model = two_adapters()
    with pytest.raises(UserError, match=r"-1\.\.1"):
        set_active_adapters(model, torch.tensor([0, 2]))
    with pytest.raises(UserError, match="1-D integer"):
        set_active_adapters(model, torch.tensor([[0]]))
    with pytest.raises(UserError, match="no adapters"):
        set_active_adapters(tiny(), torch.tensor([0]))
    moe = tiny(moe_experts=4, moe_top_k=2, mlp="moe")
    add_adapters(moe, LoRASpec(target_modules=("gate_proj",)))
    with pytest.raises(UserError, match="experts"):
        set_active_adapters(moe, torch.tensor([0]))
