"""LoRA over our NF4 base against PEFT's QLoRA layer over bitsandbytes' Linear4bit (nf4, double
quantization, fp32 compute): same quantized base, outputs, gradients, and adapter files both ways.
bitsandbytes and peft are imported unconditionally: without them these tests fail, they never skip."""

import copy

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
from torch import nn

from lora import (LoRAConfig, cast_frozen, inject_lora, load_adapter, lora_layers, mark_only_lora_trainable, merge_lora,
                  save_adapter)
from lora.quant import NF4Linear, replace_with_nf4
from tests.lora_fixtures import peft_lora_modules, randomize_lora

QUANTIZED = ["up", "gate", "down"]
TARGETS = r"up|down"  # `gate` stays a frozen NF4 layer without LoRA


class TinyGatedMLP(nn.Module):
    """A LLaMA-style gated MLP with awkward sizes: `up` holds 523 blocks of 64 (3 nested blocks of 256),
    `down` ends in a partial block, `gate` has no bias."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(130)
        self.up = nn.Linear(130, 257)
        self.gate = nn.Linear(130, 257, bias=False)
        self.down = nn.Linear(257, 33)

    def forward(self, x):
        h = self.norm(x)
        return self.down(F.silu(self.gate(h)) * self.up(h))


def base_model(seed: int = 0) -> TinyGatedMLP:
    torch.manual_seed(seed)
    return TinyGatedMLP().eval()


def ours_nf4(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    for path in QUANTIZED:
        replace_with_nf4(model, path)
    return model


def bnb_nf4(base: nn.Module) -> nn.Module:
    """The same base with each Linear as bitsandbytes' Linear4bit, flagged as transformers flags a 4-bit model."""
    model = copy.deepcopy(base)
    for path in QUANTIZED:
        linear = getattr(model, path)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        # On CPUs with AVX512-BF16, bitsandbytes' eval-mode inference repacks the weight for a bf16 kernel
        # (bf16 inputs, and out_features a multiple of 32): off, so the reference computes in fp32 everywhere.
        layer.support_avx512bf16_for_cpu = False
        setattr(model, path, layer.to("cpu"))  # moving a Params4bit to a device is what quantizes it
    model.is_loaded_in_4bit = True  # PEFT then wraps each Linear4bit in its QLoRA layer (lora.bnb.Linear4bit)
    return model


def lora_pair(config: LoRAConfig):
    """(base, ours over NF4 with random LoRA, PEFT over bitsandbytes with the same LoRA weights)."""
    base = base_model()
    ours = ours_nf4(base)
    inject_lora(ours, config)
    randomize_lora(ours, seed=3, scale=0.1)
    mark_only_lora_trainable(ours)
    reference = get_peft_model(bnb_nf4(base), LoraConfig(target_modules=TARGETS, r=config.r, lora_alpha=config.alpha,
                                                                use_rslora=config.rslora))
    layers = dict(ours.named_modules())
    with torch.no_grad():
        for path, layer in peft_lora_modules(reference).items():
            assert isinstance(layer, PeftLinear4bit), f"PEFT must use its 4-bit LoRA layer at {path}"
            layer.lora_A["default"].weight.copy_(layers[path].lora_A.weight)
            layer.lora_B["default"].weight.copy_(layers[path].lora_B.weight)
    return base, ours, reference


def test_quantized_base_equals_bitsandbytes_linear4bit():
    base = base_model()
    ours, reference = ours_nf4(base), bnb_nf4(base)
    for path in QUANTIZED:
        mine, theirs = getattr(ours, path), getattr(reference, path)
        state = theirs.weight.quant_state
        assert torch.equal(mine.weight.packed, theirs.weight.data.view(-1))
        assert torch.equal(mine.weight.absmax, state.absmax)
        assert torch.equal(mine.weight.nested_absmax, state.state2.absmax)
        assert torch.equal(mine.weight.offset, state.offset)
    x = torch.randn(2, 5, 130, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_gradients_equal_peft_over_bitsandbytes(rslora):
    config = LoRAConfig(TARGETS, r=4, alpha=8, rslora=rslora)
    base, ours, reference = lora_pair(config)
    assert sorted(lora_layers(ours)) == sorted(peft_lora_modules(reference)) == ["down", "up"]
    x = torch.randn(2, 5, 130, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = ours(x), reference(x_ref)
    assert not torch.allclose(out, ours_nf4(base)(x), atol=1e-3), "the non-zero adapter must change the output"
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=0)

    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weights).sum().backward()
    (out_ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=0)
    ref_layers = peft_lora_modules(reference)
    for path, layer in lora_layers(ours).items():
        for which in ("lora_A", "lora_B"):
            grad, ref_grad = getattr(layer, which).weight.grad, getattr(ref_layers[path], which)["default"].weight.grad
            torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0)
        assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0


def test_adapter_trained_on_our_4bit_base_loads_in_peft_on_bitsandbytes(tmp_path):
    config = LoRAConfig(TARGETS, r=4, alpha=8)
    base = base_model()
    ours = ours_nf4(base)
    inject_lora(ours, config)
    mark_only_lora_trainable(ours)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, target = torch.randn(4, 3, 130, generator=gen), torch.randn(4, 3, 33, generator=gen)
        optimizer.zero_grad()
        F.mse_loss(ours(x), target).backward()
        optimizer.step()
    save_adapter(ours, tmp_path / "adapter", config)

    reference = PeftModel.from_pretrained(bnb_nf4(base), tmp_path / "adapter").eval()
    assert all(isinstance(layer, PeftLinear4bit) for layer in peft_lora_modules(reference).values())
    x = torch.randn(2, 5, 130, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = ours(x)
        assert not torch.allclose(out, ours_nf4(base)(x), atol=1e-3), "three steps must have moved the adapter"
        torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=0)
        reloaded = ours_nf4(base)
        load_adapter(reloaded, tmp_path / "adapter")  # onto NF4Linear layers that have no LoRA yet
        assert torch.equal(reloaded(x), out)


def test_injection_over_nf4_keeps_keys_targets_and_freezing():
    base = base_model()
    dense, quantized = copy.deepcopy(base), ours_nf4(base)
    before = set(quantized.state_dict())
    assert inject_lora(quantized, LoRAConfig(r"up.*|down")) == ["up", "down"], "an NF4 weight is never a target"
    inject_lora(dense, LoRAConfig(r"up.*|down"))
    lora_keys = {k for k in dense.state_dict() if ".lora_" in k}
    assert set(quantized.state_dict()) == before | lora_keys  # the same adapter keys; base keys unchanged
    assert {"up.weight.packed", "up.weight.absmax", "up.weight.nested_absmax", "up.weight.offset"} <= before

    n_lora = sum(p.numel() for n, p in quantized.named_parameters() if ".lora_" in n)
    assert mark_only_lora_trainable(quantized) == n_lora
    assert not quantized.up.bias.requires_grad
    for layer in lora_layers(quantized).values():
        assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32

    with pytest.raises(ValueError, match=r"up\\.weight' matches no module"):
        inject_lora(ours_nf4(base), LoRAConfig(r"up\.weight"))
    with pytest.raises(ValueError, match=r"target matches norm, a LayerNorm, but LoRA here wraps only nn\.Linear"):
        inject_lora(ours_nf4(base), LoRAConfig(r"norm|up"))


def test_cast_frozen_leaves_the_nf4_state_alone_and_lora_stays_fp32():
    model = ours_nf4(base_model().to(torch.bfloat16))
    inject_lora(model, LoRAConfig(TARGETS, r=4, alpha=8))
    mark_only_lora_trainable(model)
    packed, absmax = model.up.weight.packed.clone(), model.up.weight.absmax.clone()
    cast_frozen(model, torch.bfloat16)
    assert model.up.weight.packed.dtype == torch.uint8 and torch.equal(model.up.weight.packed, packed)
    assert torch.equal(model.up.weight.absmax, absmax) and model.up.weight.nested_absmax.dtype == torch.float32
    assert model.up.lora_A.weight.dtype == torch.float32 and model.gate.weight.dtype == torch.bfloat16
    out = model(torch.randn(2, 130, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_merge_onto_an_nf4_base_is_refused_naming_the_module():
    model = ours_nf4(base_model())
    inject_lora(model, LoRAConfig(TARGETS, r=4, alpha=8))
    randomize_lora(model, seed=1)
    assert model.down.delta_weight().shape == (33, 257)
    with pytest.raises(ValueError, match=r"cannot merge LoRA layer up: its base weight is 4-bit NF4"):
        merge_lora(model)
    with pytest.raises(ValueError, match=r"LoRA layer down: .*original 16-bit weights"):
        model.down.merge()
    assert not any(layer.merged for layer in lora_layers(model).values())


def test_nf4_model_state_dict_round_trips():
    source, target = ours_nf4(base_model(0)), ours_nf4(base_model(1))
    target.load_state_dict(source.state_dict())
    x = torch.randn(3, 130)
    assert torch.equal(target(x), source(x))
    assert isinstance(target.up, NF4Linear)
