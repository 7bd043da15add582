"""The LoRA variants' adapter files both ways with PEFT: rank/alpha patterns, lora_bias, modules_to_save,
PiSSA/OLoRA inits (the init re-run on load), GPT-2's fan_in_fan_out."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from lora import LoRAConfig, inject_lora, load_adapter, lora_layers, save_adapter
from lora.adapter import read_adapter_config
from tests.lora_fixtures import peft_lora_modules, randomize_lora, run, tiny_net, tiny_qwen2_audio_encoder



def peft_variant(tmp_path, **fields):
    """A PEFT adapter over tiny_net with random A, B (and bias), and modules_to_save moved off their init, saved."""
    from peft import LoraConfig, get_peft_model

    base = tiny_net(0)
    torch.manual_seed(0)
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=r".*self_attn\.(q|v)_proj|head\.0", r=4,
                                                               lora_alpha=8, **fields))
    randomize_lora(reference, seed=6)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B.default.bias" in name or "modules_to_save.default" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    reference.save_pretrained(tmp_path / "peft")
    return base, reference.eval()


VARIANTS = {
    "patterns": dict(rank_pattern={"q_proj": 2, r"^layers\.1\.self_attn\.v_proj": 6},
                     alpha_pattern={"head.0": 3, "v_proj": 5}),
    "lora_bias": dict(lora_bias=True),
    "modules_to_save": dict(modules_to_save=["head.2", "layers.0.norm"]),
    "pissa": dict(init_lora_weights="pissa", lora_dropout=0.1),
    "pissa_niter": dict(init_lora_weights="pissa_niter_2"),
    "olora": dict(init_lora_weights="olora", use_rslora=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_variant_adapter_loads_in_ours_and_ours_in_peft(variant, tmp_path):
    from peft import PeftModel

    base, reference = peft_variant(tmp_path, **VARIANTS[variant])
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    expected = run(reference, x)
    ours = copy.deepcopy(base)
    torch.manual_seed(0)  # pissa_niter_N draws its start from the global RNG: the init's seed gives the init's residual
    config = load_adapter(ours, tmp_path / "peft")
    assert sorted(lora_layers(ours)) == sorted(peft_lora_modules(reference))
    torch.testing.assert_close(run(ours.eval(), x), expected, atol=1e-6, rtol=0)
    if variant == "patterns":
        assert [lora_layers(ours)[f"layers.1.self_attn.{n}_proj"].r for n in "qv"] == [2, 6]
    save_adapter(ours, tmp_path / "ours", config)
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    torch.manual_seed(0)
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(run(again, x), expected, atol=1e-6, rtol=0)


def test_modules_to_save_are_written_in_peft_keys_and_checked(tmp_path):
    from peft import PeftModel

    base = tiny_net(0)
    ours = copy.deepcopy(base)
    config = LoRAConfig(r".*v_proj", r=4, alpha=8, modules_to_save=("head.2",))
    inject_lora(ours, config)
    randomize_lora(ours, seed=2)
    with torch.no_grad():
        ours.head[2].weight.mul_(-1)  # the trained head
    save_adapter(ours, tmp_path / "a", config)
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert {"base_model.model.head.2.weight", "base_model.model.head.2.bias"} <= keys
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"] == ["head.2"]
    x = torch.randn(2, 5, 6)
    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    torch.testing.assert_close(run(reference, x), run(ours.eval(), x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="logit_scale.*not a module"):
        save_adapter(ours, tmp_path / "b", config, modules_to_save=["logit_scale"])
    encoder = tiny_qwen2_audio_encoder(0)[0]
    inject_lora(encoder, LoRAConfig(r".*q_proj"))
    with pytest.raises(ValueError, match=r"'layer_norm' would also select layers\.0\.self_attn_layer_norm in PEFT"):
        save_adapter(encoder, tmp_path / "b", LoRAConfig(r".*q_proj"), modules_to_save=["layer_norm"])
    with pytest.raises(ValueError, match="contains layers.0.self_attn.v_proj"):
        save_adapter(ours, tmp_path / "b", config, modules_to_save=["layers.0.self_attn"])


def test_gpt2_conv1d_adapter_with_fan_in_fan_out_loads_onto_linear_weights(tmp_path):
    """fan_in_fan_out is the base's layout: PEFT's adapter over GPT-2's Conv1D, loaded onto the same model with
    every Conv1D ported to nn.Linear (weight transposed), gives PEFT's outputs, and ours loads back into GPT-2."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    gpt2_config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    gpt2 = transformers.GPT2Model(gpt2_config).eval()
    reference = get_peft_model(copy.deepcopy(gpt2), LoraConfig(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8,
                                                               fan_in_fan_out=True))
    randomize_lora(reference, seed=8)
    reference.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ported = copy.deepcopy(gpt2)
    for path, module in list(ported.named_modules()):
        if isinstance(module, Conv1D):
            linear = torch.nn.Linear(*module.weight.shape)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, name = path.rpartition(".")
            setattr(ported.get_submodule(parent), name, linear)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    load_adapter(ported, tmp_path / "peft")
    ours_out = ported(ids).last_hidden_state
    torch.testing.assert_close(ours_out, reference(ids).last_hidden_state, atol=1e-6, rtol=0)
    save_adapter(ported, tmp_path / "ours", read_adapter_config(tmp_path / "peft"))
    back = PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "ours").eval()  # PEFT sets fan_in_fan_out itself
    torch.testing.assert_close(back(ids).last_hidden_state, ours_out, atol=1e-6, rtol=0)


def test_overlapping_pattern_keys_keep_their_order_in_our_files(tmp_path):
    """The first key that applies wins, so order matters when keys overlap. PEFT writes adapter_config.json with
    sorted keys, which can reorder them (its own file then disagrees with its tensors); ours keep the config's order,
    and PEFT, reading a file in its order, gives every layer the rank ours has."""
    from peft import PeftModel

    base = tiny_net(0)
    ours = copy.deepcopy(base)
    config = LoRAConfig(r".*self_attn\.(q|v)_proj", r=4, alpha=8, rank_pattern={"q_proj": 2, r"layers\.1\..*": 6})
    inject_lora(ours, config)
    assert [lora_layers(ours)[f"layers.1.self_attn.{n}_proj"].r for n in "qv"] == [2, 6]
    randomize_lora(ours, seed=2)
    save_adapter(ours, tmp_path / "a", config)
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert list(saved["rank_pattern"]) == ["q_proj", r"layers\.1\..*"]
    x = torch.randn(2, 5, 6)
    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    torch.testing.assert_close(run(reference, x), run(ours.eval(), x), atol=1e-6, rtol=0)
    saved["rank_pattern"] = dict(sorted(saved["rank_pattern"].items()))  # as PEFT would have written it
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight has shape \(2, 16\), expected \(6, 16\)"):
        load_adapter(copy.deepcopy(base), tmp_path / "a")
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
