"""DoRA (lora/dora.py) against PEFT 0.21.2's DoRA on the same weights: init, forward in train and eval
mode, gradients of A, B, m and the input, merge and unmerge, adapter files both ways, and over NF4."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from lora import (LinearWithLoRA, LoRAConfig, inject_lora, load_adapter, lora_layers, mark_only_lora_trainable,
                  merge_lora, save_adapter, unmerge_lora)
from lora.quant import NF4Tensor
from tests.lora_fixtures import peft_lora_modules, randomize_lora, run, tiny_net
from tests.lora.test_lora_nf4_peft_parity import base_model as gated_mlp, bnb_nf4, ours_nf4

TARGETS = [r".*self_attn\.(q|k|v|out)_proj", r"head\.0"]  # k_proj has no bias: both of PEFT's bias cases
PEFT_TARGETS = "|".join(f"(?:{p})" for p in TARGETS)


def peft_dora(base, target_modules=PEFT_TARGETS, **settings):
    """PEFT's DoRA over `base` (a copy unless it is a bitsandbytes model built for the purpose), r=4, alpha=8."""
    return get_peft_model(base, LoraConfig(target_modules=target_modules, r=4, lora_alpha=8, use_dora=True, **settings))


def make_input(seed: int = 1, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def randomize_magnitudes(model, seed: int = 4):
    """m away from ||W + s·BA||, so m/n - 1 is not zero and the magnitude term is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen))


def peft_magnitude(layer) -> torch.Tensor:
    return layer.lora_magnitude_vector["default"].weight


def dora_pair(dropout: float = 0.0, rslora: bool = False):
    """(base, ours with random A, B, m, PEFT's DoRA with the same three copied in)."""
    base = tiny_net(0)
    config = LoRAConfig(TARGETS, r=4, alpha=8, dropout=dropout, rslora=rslora, use_dora=True)
    ours = copy.deepcopy(base)
    inject_lora(ours, config)
    randomize_lora(ours, seed=3)
    randomize_magnitudes(ours)
    reference = peft_dora(copy.deepcopy(base), lora_dropout=dropout, use_rslora=rslora)
    layers = dict(ours.named_modules())
    with torch.no_grad():
        for path, layer in peft_lora_modules(reference).items():
            layer.lora_A["default"].weight.copy_(layers[path].lora_A.weight)
            layer.lora_B["default"].weight.copy_(layers[path].lora_B.weight)
            peft_magnitude(layer).copy_(layers[path].lora_magnitude_vector)
    return base, ours, reference


def test_fresh_dora_is_the_base_model_and_its_magnitude_is_peft_init():
    base = tiny_net(0)
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(TARGETS, r=4, alpha=8, use_dora=True))
    reference = peft_dora(copy.deepcopy(base))
    x = make_input()
    assert torch.equal(run(ours, x), run(base, x)), "m = ||W||_c and B = 0 must give the base exactly"
    for path, layer in peft_lora_modules(reference).items():
        mine = dict(ours.named_modules())[path]
        assert mine.lora_magnitude_vector.shape == (mine.out_features,)
        torch.testing.assert_close(mine.lora_magnitude_vector, peft_magnitude(layer), atol=0, rtol=0)
        torch.testing.assert_close(mine.lora_magnitude_vector, mine.weight.norm(dim=1), atol=1e-6, rtol=0)


def test_keys_and_trainable_parameters():
    layer = LinearWithLoRA(nn.Linear(12, 10), r=4, alpha=8, use_dora=True)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    assert layer.adapter_params() == ["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"]
    model = tiny_net(0)
    inject_lora(model, LoRAConfig(r".*q_proj", r=2, alpha=4, use_dora=True))
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.self_attn.q_proj.{p}" for i in (0, 1) for p in layer.adapter_params()}
    with pytest.raises(ValueError, match="lora_bias and DoRA"):
        LinearWithLoRA(nn.Linear(4, 4), r=2, alpha=4, lora_bias=True, use_dora=True)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("mode", ["eval", "train_no_dropout", "train_dropout"])
def test_forward_and_gradients_equal_peft(mode, rslora):
    dropout = 0.3 if mode == "train_dropout" else 0.0
    base, ours, reference = dora_pair(dropout=dropout, rslora=rslora)
    mark_only_lora_trainable(ours)
    for model in (ours, reference):
        model.train(mode != "eval")
    x, x_ref = make_input(requires_grad=True), make_input(requires_grad=True)
    torch.manual_seed(123)  # the same dropout masks: one draw per layer, in the same order as PEFT's
    out = run(ours, x)
    torch.manual_seed(123)
    out_ref = run(reference, x_ref)
    assert not torch.allclose(out, run(base, x.detach()), atol=1e-3), "the adapter must change the output"
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=0)

    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weights).sum().backward()
    (out_ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    ref_layers = peft_lora_modules(reference)
    for path, layer in lora_layers(ours).items():
        ref = ref_layers[path]
        pairs = [(layer.lora_A.weight, ref.lora_A["default"].weight),
                 (layer.lora_B.weight, ref.lora_B["default"].weight),
                 (layer.lora_magnitude_vector, peft_magnitude(ref))]
        for mine, theirs in pairs:
            assert mine.grad.abs().sum() > 0, f"{path}: no gradient"
            torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=1e-5)


def test_the_norm_gets_no_gradient():
    """§4.3: n = ||W + s·BA||_c is a constant in backward, so B's gradient is that of a fixed rescaling."""
    torch.manual_seed(0)
    layer = LinearWithLoRA(nn.Linear(5, 3), r=2, alpha=2, use_dora=True)
    randomize_lora(nn.ModuleDict({"m": layer}), seed=1)
    x = torch.randn(4, 5)
    adapted = layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight  # W + s·BA, (out, in)
    n = adapted.detach().norm(dim=1)
    by_hand = (layer.lora_magnitude_vector / n)[:, None] * adapted
    expected_out = x @ by_hand.T + layer.bias
    grad_expected = torch.autograd.grad(expected_out.sum(), layer.lora_B.weight)[0]
    out = layer(x)
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), layer.lora_B.weight)[0], grad_expected, atol=1e-6, rtol=0)


def test_merge_equals_peft_merge_and_unmerge_restores_the_base():
    base, ours, reference = dora_pair()
    x = make_input()
    unmerged = run(ours, x)
    merge_lora(ours)
    torch.testing.assert_close(run(ours, x), unmerged, atol=1e-5, rtol=0)
    merged_ref = dict(copy.deepcopy(reference).merge_and_unload().named_modules())
    for path, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.weight, merged_ref[path].weight, atol=1e-6, rtol=0)
    unmerge_lora(ours)
    originals = dict(base.named_modules())
    for path, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.weight, originals[path].weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(ours, x), unmerged, atol=1e-6, rtol=0)


def test_our_dora_adapter_loads_in_peft(tmp_path):
    base, ours, _ = dora_pair(dropout=0.1)
    config = LoRAConfig(TARGETS, r=4, alpha=8, dropout=0.1, use_dora=True)
    save_adapter(ours, tmp_path, config)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    expected = {f"base_model.model.{p}.lora_magnitude_vector" for p in lora_layers(ours)}
    assert {k for k in keys if "magnitude" in k} == expected
    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = make_input()
    torch.testing.assert_close(run(reference, x), run(ours.eval(), x), atol=1e-6, rtol=0)


def test_peft_dora_adapter_loads_here(tmp_path):
    base, _, reference = dora_pair()
    reference.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    config = load_adapter(ours, tmp_path)
    assert config.use_dora and all(layer.use_dora for layer in lora_layers(ours).values())
    x = make_input()
    torch.testing.assert_close(run(ours, x), run(reference.eval(), x), atol=1e-6, rtol=0)


def test_dora_file_without_magnitudes_is_refused(tmp_path):
    base, ours, _ = dora_pair()
    save_adapter(ours, tmp_path, LoRAConfig(TARGETS, r=4, alpha=8, use_dora=True))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {"use_dora": False}))
    with pytest.raises(ValueError, match=r"unexpected key .*lora_magnitude_vector .*use_dora=False"):
        load_adapter(copy.deepcopy(base), tmp_path)


def nf4_dora_pair(dropout: float = 0.0):
    """QDoRA: ours over our NF4 base, PEFT's over bitsandbytes' Linear4bit, the same A, B, m."""
    base = gated_mlp()
    config = LoRAConfig(r"up|down", r=4, alpha=8, dropout=dropout, use_dora=True)
    ours = ours_nf4(base)
    inject_lora(ours, config)
    randomize_lora(ours, seed=3, scale=0.1)
    reference = peft_dora(bnb_nf4(base), target_modules=r"up|down", lora_dropout=dropout)
    layers = dict(ours.named_modules())
    with torch.no_grad():
        for path, layer in peft_lora_modules(reference).items():
            # the magnitude PEFT initialised from bitsandbytes' dequantized weight equals ours from our NF4
            torch.testing.assert_close(layers[path].lora_magnitude_vector, peft_magnitude(layer), atol=1e-6, rtol=1e-6)
            layer.lora_A["default"].weight.copy_(layers[path].lora_A.weight)
            layer.lora_B["default"].weight.copy_(layers[path].lora_B.weight)
    randomize_magnitudes(ours)
    with torch.no_grad():
        for path, layer in peft_lora_modules(reference).items():
            peft_magnitude(layer).copy_(layers[path].lora_magnitude_vector)
    return ours, reference


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_qdora_over_nf4_equals_peft_over_bitsandbytes(dropout):
    ours, reference = nf4_dora_pair(dropout)
    assert all(isinstance(layer.weight, NF4Tensor) for layer in lora_layers(ours).values())
    mark_only_lora_trainable(ours)
    ours.train(), reference.train()
    x = torch.randn(2, 5, 130, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)
    out = ours(x)
    torch.manual_seed(7)
    out_ref = reference(x_ref)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=0)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weights).sum().backward()
    (out_ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=0)
    for path, ref in peft_lora_modules(reference).items():
        layer = dict(ours.named_modules())[path]
        torch.testing.assert_close(layer.lora_magnitude_vector.grad, peft_magnitude(ref).grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.weight.grad, ref.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-5)


def test_fresh_dora_over_bf16_is_the_base_exactly_unlike_peft():
    """PEFT computes m in the base's bf16 and rounds it, so its fresh DoRA layer is not the base layer; ours is."""
    base = tiny_net(0).to(torch.bfloat16)
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(r".*q_proj", r=4, alpha=8, use_dora=True))
    reference = peft_dora(copy.deepcopy(base), target_modules=r".*q_proj")
    layer = ours.layers[0].self_attn.q_proj
    assert layer.lora_magnitude_vector.dtype == torch.float32
    x = make_input().to(torch.bfloat16)
    assert torch.equal(run(ours, x), run(base, x))
    peft_m = peft_magnitude(peft_lora_modules(reference)["layers.0.self_attn.q_proj"])
    assert not torch.equal(peft_m, layer.lora_magnitude_vector)
    torch.testing.assert_close(peft_m, layer.lora_magnitude_vector.bfloat16().float(), atol=0, rtol=0)
