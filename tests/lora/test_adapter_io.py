"""Adapters in PEFT's format: ours load in PEFT, PEFT's load in ours, and every damage is named."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora import LoRAConfig, inject_lora, load_adapter, lora_layers, save_adapter
from tests.lora_fixtures import peft_lora_modules, randomize_lora, run, tiny_net, tiny_qwen2_audio_encoder

MODELS = {
    "tiny_net": (lambda: tiny_net(0), lambda: torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))),
    "qwen2_audio": (lambda: tiny_qwen2_audio_encoder(0)[0], lambda: tiny_qwen2_audio_encoder(0)[1]),
}


def trained_adapter(model_name, targets, tmp_path, rslora=False):
    make_base, make_input = MODELS[model_name]
    base = make_base()
    ours = copy.deepcopy(base)
    config = LoRAConfig(targets, r=4, alpha=8, dropout=0.1, rslora=rslora)
    injected = inject_lora(ours, config)
    randomize_lora(ours, seed=5)
    save_adapter(ours, tmp_path / "adapter", config, base_model_name_or_path="tiny/base")
    return base, ours.eval(), injected, make_input()


@pytest.mark.parametrize(
    "model_name, targets",
    [("tiny_net", [r".*self_attn\.(q|v)_proj", r"head\.0"]), ("qwen2_audio", r".*self_attn\.(q|k|v|out)_proj"),
     ("qwen2_audio", [r".*fc1", r"layers\.0\.self_attn\.k_proj"])],
)
@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_in_peft(model_name, targets, rslora, tmp_path):
    from peft import PeftModel

    base, ours, injected, x = trained_adapter(model_name, targets, tmp_path, rslora)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 8 and saved["bias"] == "none"
    assert saved["use_rslora"] is rslora and saved["base_model_name_or_path"] == "tiny/base"
    assert set(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == {
        f"base_model.model.{p}.lora_{ab}.weight" for p in injected for ab in "AB"
    }
    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert sorted(peft_lora_modules(reference)) == sorted(injected)
    torch.testing.assert_close(run(reference, x), run(ours, x), atol=1e-6, rtol=0)


def peft_adapter(model_name, target_modules, tmp_path, use_rslora=False):
    from peft import LoraConfig, get_peft_model

    make_base, make_input = MODELS[model_name]
    base = make_base()
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=target_modules, r=4, lora_alpha=8,
                                                               use_rslora=use_rslora))
    randomize_lora(reference, seed=6)
    reference.save_pretrained(tmp_path / "peft")
    return base, reference.eval(), make_input()


@pytest.mark.parametrize(
    "model_name, target_modules",
    [
        ("tiny_net", r".*self_attn\.(k|out)_proj"),
        ("tiny_net", ["q_proj", "head.2"]),  # a list: exact names or dotted suffixes
        ("qwen2_audio", r".*\.(q_proj|fc2)"),
        ("qwen2_audio", ["v_proj", "layers.1.fc1"]),
    ],
)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_in_ours(model_name, target_modules, use_rslora, tmp_path):
    base, reference, x = peft_adapter(model_name, target_modules, tmp_path, use_rslora)
    ours = copy.deepcopy(base)
    config = load_adapter(ours, tmp_path / "peft")
    assert (config.r, config.alpha, config.rslora) == (4, 8, use_rslora)
    assert sorted(lora_layers(ours)) == sorted(peft_lora_modules(reference))
    # The returned config reads target_modules as PEFT does: it selects the same layers.
    assert sorted(inject_lora(copy.deepcopy(base), config)) == sorted(peft_lora_modules(reference))
    torch.testing.assert_close(run(ours.eval(), x), run(reference, x), atol=1e-6, rtol=0)


def test_load_into_already_injected_layers(tmp_path):
    base, ours, injected, x = trained_adapter("tiny_net", r".*v_proj", tmp_path)
    fresh = copy.deepcopy(base)
    inject_lora(fresh, LoRAConfig(r".*v_proj", r=4, alpha=8))
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(run(fresh.eval(), x), run(ours, x), atol=0, rtol=0)


def damage(tmp_path, edit_tensors=None, edit_config=None):
    base, _, _, _ = trained_adapter("tiny_net", r".*self_attn\.(q|v)_proj", tmp_path)
    adapter = tmp_path / "adapter"
    if edit_tensors:
        tensors = load_file(adapter / "adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, adapter / "adapter_model.safetensors")
    if edit_config:
        config = json.loads((adapter / "adapter_config.json").read_text())
        edit_config(config)
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


def test_missing_key_is_named(tmp_path):
    base, adapter = damage(tmp_path,
                           edit_tensors=lambda t: t.pop("base_model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    with pytest.raises(ValueError,
                       match=r"missing key base_model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        load_adapter(base, adapter)
    assert not lora_layers(base)


def test_unexpected_key_is_named(tmp_path):
    base, adapter = damage(tmp_path,
                           edit_tensors=lambda t: t.update({"base_model.model.head.0.weight": torch.zeros(16, 16)}))
    with pytest.raises(ValueError, match=r"unexpected key 'base_model\.model\.head\.0\.weight'"):
        load_adapter(base, adapter)


def test_shape_mismatch_is_named(tmp_path):
    def widen(t):
        t["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 17)

    base, adapter = damage(tmp_path, edit_tensors=widen)
    with pytest.raises(ValueError,
                       match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \(4, 17\), expected \(4, 16\)"):
        load_adapter(base, adapter)
    assert not lora_layers(base), "nothing may be injected when a check fails"


def test_rank_in_config_disagreeing_with_tensors_is_named(tmp_path):
    base, adapter = damage(tmp_path, edit_config=lambda c: c.update(r=8))
    with pytest.raises(ValueError, match=r"lora_A\.weight has shape \(4, 16\), expected \(8, 16\)"):
        load_adapter(base, adapter)


def test_module_missing_from_model_is_named(tmp_path):
    _, adapter = damage(tmp_path)
    other = tiny_net(0)
    del other.layers[1]
    with pytest.raises(ValueError,
                       match=r"names module 'layers\.1\.self_attn\.q_proj', which this model does not have"):
        load_adapter(other, adapter)


def test_layer_with_lora_but_absent_from_adapter_is_named(tmp_path):
    base, adapter = damage(tmp_path)
    inject_lora(base, LoRAConfig(r"head\.0", r=4, alpha=8))
    with pytest.raises(ValueError, match=r"missing key base_model\.model\.head\.0\.lora_A\.weight"):
        load_adapter(base, adapter)


def test_truncated_weights_file_is_named(tmp_path):
    base, adapter = damage(tmp_path)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError,
                       match=r"adapter_model\.safetensors cannot be read as safetensors .*truncated or corrupted"):
        load_adapter(base, adapter)


def test_garbage_weights_file_is_named(tmp_path):
    base, adapter = damage(tmp_path)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_adapter(base, adapter)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(peft_type="IA3"), "only 'LORA'"),
        (lambda c: c.update(layers_to_transform=[0]),
         r"layers_to_transform=\[0\] \(would need restricting the targets"),
        (lambda c: c.update(init_lora_weights="loftq"), r"init_lora_weights='loftq' \(would need its initialisation"),
        (lambda c: c.update(bias="all"), "bias"),
        (lambda c: c.pop("r"), "has no 'r'"),
    ],
)
def test_config_problems_are_named(tmp_path, edit, message):
    base, adapter = damage(tmp_path, edit_config=edit)
    with pytest.raises(ValueError, match=message):
        load_adapter(base, adapter)


def test_missing_and_invalid_files_are_named(tmp_path):
    base, adapter = damage(tmp_path)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        load_adapter(base, adapter)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json does not exist"):
        load_adapter(base, adapter)
    base2, adapter2 = damage(tmp_path / "second")
    (adapter2 / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors does not exist"):
        load_adapter(base2, adapter2)


def test_save_refuses_a_model_without_lora_and_a_config_that_disagrees(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(tiny_net(0), tmp_path / "a", LoRAConfig(".*q_proj"))
    model = tiny_net(0)
    inject_lora(model, LoRAConfig(r".*q_proj", r=4, alpha=8))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj has r=4"):
        save_adapter(model, tmp_path / "a", LoRAConfig(r".*q_proj", r=8, alpha=8))


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    _, ours, _, _ = trained_adapter("tiny_net", r".*q_proj", tmp_path)
    adapter = tmp_path / "adapter"
    before = (adapter / "adapter_model.safetensors").read_bytes()
    randomize_lora(ours, seed=99)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lora.adapter.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(ours, adapter, LoRAConfig(r".*q_proj", r=4, alpha=8, dropout=0.1))
    assert (adapter / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

