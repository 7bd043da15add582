"""LinearWithLoRA on its own: init, keys, dropout, merge and unmerge."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora import LinearWithLoRA, LoRAConfig, inject_lora, merge_lora, unmerge_lora
from tests.lora_fixtures import randomize_lora, tiny_net


def make_layer(dropout=0.0, rslora=False, bias=True) -> tuple[nn.Linear, LinearWithLoRA]:
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias)
    layer = LinearWithLoRA(base, r=4, alpha=8, dropout=dropout, rslora=rslora)
    randomize_lora(nn.ModuleDict({"m": layer}), seed=1)
    return base, layer


def test_keeps_the_base_parameters_themselves():
    base = nn.Linear(12, 10)
    layer = LinearWithLoRA(base, r=4, alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.shape == (4, 12) and layer.lora_B.weight.shape == (10, 4)
    assert layer.lora_A.bias is None and layer.lora_B.bias is None
    no_bias = LinearWithLoRA(nn.Linear(12, 10, bias=False), r=4, alpha=8)
    assert no_bias.bias is None and "bias" not in no_bias.state_dict()


def test_init_is_kaiming_uniform_a_and_zero_b():
    layer = LinearWithLoRA(nn.Linear(400, 300), r=64, alpha=8)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    # Kaiming-uniform with a=sqrt(5) on fan_in=400 is U(-b, b) with b = 1/sqrt(400).
    bound = 1 / math.sqrt(400)
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > 0.95 * bound
    torch.testing.assert_close(layer.lora_A.weight.std().item(), bound / math.sqrt(3), rtol=0.05, atol=0)


def test_scaling_alpha_over_r_and_rslora():
    assert LinearWithLoRA(nn.Linear(4, 4), r=16, alpha=32).scaling == 2.0
    assert LinearWithLoRA(nn.Linear(4, 4), r=16, alpha=32, rslora=True).scaling == 8.0
    assert LoRAConfig(".*", r=16, alpha=32, rslora=True).scaling == 8.0


def test_forward_is_base_plus_scaled_low_rank_update():
    base, layer = make_layer()
    x = torch.randn(3, 12)
    expected = F.linear(x, base.weight, base.bias) + layer.scaling * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_dropout_only_in_train_mode_and_only_on_the_lora_branch():
    base, layer = make_layer(dropout=0.5)
    x = torch.randn(64, 12)
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)
    layer.eval()
    no_dropout = make_layer(dropout=0.0)[1].eval()
    torch.testing.assert_close(layer(x), no_dropout(x), atol=0, rtol=0)
    # With B=0 the branch contributes nothing, so train-mode dropout must leave the base path exact.
    nn.init.zeros_(layer.lora_B.weight)
    layer.train()
    torch.testing.assert_close(layer(x), F.linear(x, base.weight, base.bias), atol=0, rtol=0)


def test_merge_gives_unmerged_output_and_one_linear():
    base, layer = make_layer()
    original = base.weight.detach().clone()
    x = torch.randn(5, 12)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    calls = []
    layer.lora_A.register_forward_hook(lambda *args: calls.append(1))
    merged = layer(x)
    assert not calls, "a merged layer must not run its LoRA branch"
    torch.testing.assert_close(merged, F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), original, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)


def test_merge_twice_and_unmerge_unmerged_are_errors():
    _, layer = make_layer()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_merge_refuses_non_finite_and_leaves_weights_alone():
    model = tiny_net(0)
    inject_lora(model, LoRAConfig(r".*q_proj", r=2, alpha=4))
    layer = model.layers[1].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj"):
        merge_lora(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True, atol=0, rtol=0)
    assert not any(m.merged for m in (model.layers[0].self_attn.q_proj, layer))
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()


def test_merge_lora_and_unmerge_lora_on_a_model():
    model = tiny_net(0)
    original = copy.deepcopy(model.state_dict())
    inject_lora(model, LoRAConfig(r".*(q|v)_proj", r=2, alpha=4))
    randomize_lora(model, seed=2)
    x = torch.randn(2, 3, 6)
    expected = model(x)
    assert len(merge_lora(model)) == 4
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for key, value in original.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=0)


def test_injection_adds_only_lora_keys_so_the_original_checkpoint_still_loads():
    model = tiny_net(0)
    checkpoint = copy.deepcopy(model.state_dict())
    inject_lora(model, LoRAConfig(r".*_proj", r=2, alpha=4))
    keys = set(model.state_dict())
    assert keys - set(checkpoint) == {k for k in keys if ".lora_" in k}
    assert set(checkpoint) <= keys
    missing, unexpected = model.load_state_dict(checkpoint, strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)
