"""inject_lora's selection rules and errors, freezing, and the trainable summary."""

import copy

import pytest
import torch

from lora import LoRAConfig, inject_lora, lora_layers, lora_state_dict, mark_only_lora_trainable, trainable_summary
from tests.lora_fixtures import tiny_net, tiny_qwen2_audio_encoder


def test_targets_are_fullmatched_and_or_ed():
    model = tiny_net(0)
    injected = inject_lora(model, LoRAConfig([r"layers\.0\.self_attn\.q_proj", r"head\.2"], r=2))
    assert injected == ["layers.0.self_attn.q_proj", "head.2"]
    # 'q_proj' alone occurs in every path above but fullmatches none of them.
    with pytest.raises(ValueError, match=r"prefix it with '\.\*'"):
        inject_lora(tiny_net(0), LoRAConfig("q_proj"))


def test_no_match_lists_the_closest_linear_modules():
    model, _ = tiny_qwen2_audio_encoder()
    with pytest.raises(ValueError) as err:
        inject_lora(model, LoRAConfig([r".*self_attn\.q_proj", r"audio_tower.*self_attn\.o_proj"]))
    message = str(err.value)
    assert message.startswith(r"target pattern 'audio_tower.*self_attn\.o_proj' matches no module")
    closest = message.split("Closest Linear modules (N = any layer index):\n")[1].split("\n")
    assert closest[0].strip() == "layers.N.self_attn.out_proj"
    assert not lora_layers(model), "a failing call must leave the model untouched"


def test_user_example_without_the_escape_matches_q_k_v_but_not_o():
    # The user's pattern from the README: (q|k|v|o)_proj; on an encoder `o_proj` does not exist,
    # and q/k/v must still be selected (the pattern as a whole matches).
    from torch import nn

    class Composite(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio_tower = tiny_qwen2_audio_encoder()[0]

    model = Composite()
    injected = inject_lora(model, LoRAConfig("audio_tower.*self_attn.(q|k|v|o)_proj"))
    assert sorted({p.rsplit(".", 1)[1] for p in injected}) == ["k_proj", "q_proj", "v_proj"]
    assert len(injected) == 3 * len(model.audio_tower.layers)


def test_match_on_a_non_linear_module_names_it_and_its_type():
    model = tiny_net(0)
    with pytest.raises(ValueError, match=r"layers\.0\.intermediate_query, a QueryFeedForward"):
        inject_lora(model, LoRAConfig(r".*(query|key|value)"))
    assert not lora_layers(model)


def test_injecting_twice_is_an_error_not_a_double_wrap():
    model = tiny_net(0)
    inject_lora(model, LoRAConfig(r".*q_proj", r=2))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj already has LoRA"):
        inject_lora(model, LoRAConfig(r".*q_proj", r=2))
    with pytest.raises(ValueError, match="part of a LoRA layer"):
        inject_lora(model, LoRAConfig(r".*q_proj\.lora_A", r=2))
    assert len(lora_layers(model)) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=[]), "empty"),
        (dict(targets="(unclosed"), "not a valid regular expression"),
        (dict(targets=".*", r=0), "positive integer"),
        (dict(targets=".*", dropout=1.0), "dropout"),
        (dict(targets=[".*", 3]), "regex string"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_mark_only_lora_trainable_with_also():
    model = tiny_net(0)
    inject_lora(model, LoRAConfig(r".*v_proj", r=2))
    count = mark_only_lora_trainable(model, also=["head.2", "logit_scale"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"layers.{i}.self_attn.v_proj.lora_{ab}.weight" for i in range(2) for ab in "AB"}
    expected |= {"head.2.weight", "head.2.bias", "logit_scale"}
    assert trainable == expected
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    with pytest.raises(ValueError, match="'head.9' names no parameter"):
        mark_only_lora_trainable(model, also=["head.9"])
    with pytest.raises(ValueError, match="no LoRA layers"):
        mark_only_lora_trainable(tiny_net(0))


def test_trainable_summary_counts_per_top_level_child():
    model = tiny_net(0)
    base_counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    inject_lora(model, LoRAConfig(r".*self_attn\.(q|k)_proj", r=3))
    mark_only_lora_trainable(model)
    summary = trainable_summary(model)
    d = 16
    lora_params = 2 * 2 * 3 * (d + d)  # 2 layers x (q, k) x r x (in + out)
    assert summary.trainable == lora_params
    assert summary.total == sum(base_counts.values()) + 1 + lora_params  # + logit_scale
    assert summary.by_child["layers"] == (lora_params, base_counts["layers"] + lora_params)
    assert summary.by_child["embed"] == (0, base_counts["embed"])
    assert summary.by_child["logit_scale"] == (0, 1)
    assert summary.lora_layers == 4
    assert f"{lora_params:,}" in str(summary) and "layers" in str(summary)


def test_lora_state_dict_holds_only_adapter_tensors():
    model = tiny_net(0)
    inject_lora(model, LoRAConfig(r".*out_proj", r=2))
    state = lora_state_dict(model)
    assert sorted(state) == sorted(f"layers.{i}.self_attn.out_proj.lora_{ab}.weight" for i in range(2) for ab in "AB")
    full = model.state_dict()
    for key, tensor in state.items():
        assert torch.equal(tensor, full[key])


def test_inject_keeps_model_function_and_parameters_shared():
    model = tiny_net(0)
    before = copy.deepcopy(model)
    q = model.layers[0].self_attn.q_proj
    weight = q.weight
    inject_lora(model, LoRAConfig(r".*q_proj", r=2))
    assert model.layers[0].self_attn.q_proj.weight is weight
    x = torch.randn(2, 3, 6)
    assert torch.equal(model(x), before(x))
