"""Our LoRA against PEFT's on the same base weights: same selection, outputs, gradients, merges."""

import copy

import pytest
import torch

from lora import LoRAConfig, inject_lora, lora_layers, mark_only_lora_trainable, merge_lora
from tests.lora_fixtures import peft_copy, peft_lora_modules, randomize_lora, run, tiny_net, tiny_qwen2_audio_encoder

CASES = {
    # name: (base model factory, input factory, targets)
    "tiny_net": (lambda: tiny_net(0), lambda: torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(1)),
                 [r".*self_attn\.(q|k|v|out)_proj", r"head\.0"]),
    "tiny_net_suffix": (lambda: tiny_net(0), lambda: torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(1)),
                        r".*(fc2|dense)"),
    "qwen2_audio": (lambda: tiny_qwen2_audio_encoder(0)[0], lambda: tiny_qwen2_audio_encoder(0)[1],
                    r".*self_attn\.(q|k|v|out)_proj"),
    "qwen2_audio_fc": (lambda: tiny_qwen2_audio_encoder(0)[0], lambda: tiny_qwen2_audio_encoder(0)[1],
                       [r"layers\.1\.fc1", r"layers\.0\..*_proj"]),
}


def build_pair(case: str, rslora: bool = False, dropout: float = 0.0, r: int = 4):
    make_base, make_input, targets = CASES[case]
    base = make_base()
    config = LoRAConfig(targets, r=r, alpha=8, dropout=dropout, rslora=rslora)
    ours = copy.deepcopy(base)
    injected = inject_lora(ours, config)
    randomize_lora(ours, seed=3)
    reference = peft_copy(base, config, ours)
    return base, ours, reference, injected, make_input()


@pytest.mark.parametrize("case", CASES)
def test_same_modules_selected_as_peft(case):
    base, ours, reference, injected, _ = build_pair(case)
    assert injected, "the case must select something"
    assert sorted(injected) == sorted(peft_lora_modules(reference))
    assert sorted(lora_layers(ours)) == sorted(injected)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_equal_peft(case, rslora):
    base, ours, reference, injected, x = build_pair(case, rslora=rslora)
    mark_only_lora_trainable(ours)
    out_ours, out_ref = run(ours, x), run(reference, x)
    assert not torch.allclose(out_ours, run(base, x), atol=1e-4), "the non-zero adapter must change the output"
    torch.testing.assert_close(out_ours, out_ref, atol=1e-6, rtol=0)

    weights = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(9))
    (out_ours * weights).sum().backward()
    (out_ref * weights).sum().backward()
    ref_layers = peft_lora_modules(reference)
    for path, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.lora_A.weight.grad, ref_layers[path].lora_A["default"].weight.grad,
                                   atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.weight.grad, ref_layers[path].lora_B["default"].weight.grad,
                                   atol=1e-6, rtol=1e-5)
        assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("case", CASES)
def test_only_lora_parameters_receive_gradients(case):
    _, ours, _, _, x = build_pair(case)
    mark_only_lora_trainable(ours)
    run(ours, x).square().sum().backward()
    for name, param in ours.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert (param.grad is not None) == is_lora, name


@pytest.mark.parametrize("case", CASES)
def test_fresh_injection_is_bit_identical_to_base(case):
    make_base, make_input, targets = CASES[case]
    base, x = make_base(), make_input()
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig(targets, r=4, alpha=8))
    # lora_B starts at zero, so the branch adds exact zeros to the base's own F.linear on the same shapes
    assert torch.equal(run(ours, x), run(base, x))


@pytest.mark.parametrize("case", ["tiny_net", "qwen2_audio"])
def test_merge_equals_peft_merge_and_unmerged_output(case):
    base, ours, reference, injected, x = build_pair(case)
    unmerged = run(ours, x)
    merge_lora(ours)
    torch.testing.assert_close(run(ours, x), unmerged, atol=1e-5, rtol=0)
    merged_ref = reference.merge_and_unload()
    ref_modules = dict(merged_ref.named_modules())
    for path, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.weight, ref_modules[path].weight, atol=1e-6, rtol=0)


def test_dropout_draws_the_same_masks_as_peft():
    base, ours, reference, _, x = build_pair("tiny_net", dropout=0.5)
    ours.train()
    reference.train()
    torch.manual_seed(123)
    out_ours = run(ours, x)
    torch.manual_seed(123)
    out_ref = run(reference, x)
    torch.testing.assert_close(out_ours, out_ref, atol=1e-6, rtol=0)


def test_half_precision_base_matches_peft_autocast_adapter_dtype():
    base = tiny_net(0).to(torch.bfloat16)
    config = LoRAConfig(r".*self_attn\.(q|v)_proj", r=4, alpha=8)
    ours = copy.deepcopy(base)
    inject_lora(ours, config)
    randomize_lora(ours, seed=3)
    reference = peft_copy(base, config, ours)
    x = torch.randn(2, 5, 6).to(torch.bfloat16)
    for layer in lora_layers(ours).values():
        assert layer.lora_A.weight.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    out_ours, out_ref = run(ours, x), run(reference, x)
    assert out_ours.dtype == torch.bfloat16
    # bits: PEFT's Linear.forward runs the same ops, in the same dtypes and order, on the same shapes
    torch.testing.assert_close(out_ours, out_ref, atol=0, rtol=0)
