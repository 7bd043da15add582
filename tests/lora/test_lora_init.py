"""PEFT's init_lora_weights against PEFT 0.21.2: gaussian, PiSSA (full and randomised SVD), OLoRA, what PiSSA and
OLoRA leave in the base weight, and the three ways back to the trained model (lora/init.py)."""

import copy

import pytest
import torch

from lora import LoRAConfig, inject_lora, lora_layers, mark_only_lora_trainable, merge_lora
from tests.lora_fixtures import peft_lora_modules, run, tiny_net
from tests.lora.test_lora_variants import TARGETS, copy_into_peft, pair, x_tiny


@pytest.mark.parametrize("init", ["gaussian", "pissa", "pissa_niter_3", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_init_equals_peft(init, rslora):
    """A, B and the (residual) base weight as PEFT's, under the same seed; the function starts unchanged."""
    config = LoRAConfig(TARGETS, r=4, alpha=8, rslora=rslora, init=init, rank_pattern={"head.0": 6})
    base, ours, reference = pair(config, seed=11)
    refs = peft_lora_modules(reference)
    for path, layer in lora_layers(ours).items():
        ref = refs[path]
        torch.testing.assert_close(layer.lora_A.weight, ref.lora_A["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.lora_B.weight, ref.lora_B["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.weight, ref.base_layer.weight, atol=1e-6, rtol=0)
        original = base.get_submodule(path).weight
        assert torch.equal(layer.weight, original) == (init == "gaussian"), "only PiSSA/OLoRA change the base"
        assert (layer.lora_B.weight.abs().sum() == 0) == (init == "gaussian")
    x = x_tiny()
    torch.testing.assert_close(run(ours, x), run(base, x), atol=1e-5, rtol=0)


def test_pissa_init_on_half_precision_and_limits():
    """Over a bf16 base the residual is PEFT's bit for bit. PEFT then rounds A and B through bf16 (it moves the
    adapter to the base's dtype before casting it back to fp32); ours keep the fp32 SVD, so W_res + s·B·A is
    closer to W: the one place we differ from PEFT here, on purpose."""
    config = LoRAConfig(r".*self_attn\.(q|v)_proj", r=4, alpha=8, init="pissa")
    base, ours, reference = pair(config, base=tiny_net(0).to(torch.bfloat16))
    for path, layer in lora_layers(ours).items():
        ref = peft_lora_modules(reference)[path]
        assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
        torch.testing.assert_close(layer.weight, ref.base_layer.weight, atol=0, rtol=0)
        for ab in ("lora_A", "lora_B"):
            theirs = getattr(ref, ab)["default"].weight
            assert torch.equal(getattr(layer, ab).weight.to(torch.bfloat16).float(), theirs), "PEFT's is ours, rounded"
        original = base.get_submodule(path).weight.float()
        error_ours = (layer.weight.float() + layer.delta_weight() - original).abs().max()
        error_peft = (ref.base_layer.weight.float() + ref.get_delta_weight("default") - original).abs().max()
        assert error_ours < error_peft
    with pytest.raises(ValueError, match=r"on head\.0: rank 20 exceeds min\(in, out\) = 16"):
        inject_lora(tiny_net(0), LoRAConfig(r"head\.0", r=20, init="olora"))
    with pytest.raises(ValueError, match="is not one of"):
        LoRAConfig(TARGETS, init="corda")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_pissa_merges_onto_the_residual_and_converts_to_plain_lora(init, tmp_path):
    """Trained on the residual base, the model is recovered three ways: merged in place, the adapter loaded onto
    the original base (the init re-run), and the rank-2r plain LoRA (PEFT's conversion) merged onto the original."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from lora import load_adapter, save_adapter
    from lora.inject import initial_adapter

    config = LoRAConfig(r".*self_attn\.(q|v)_proj|head\.0", r=4, alpha=8, init=init)
    base, ours, reference = pair(config)
    initial = initial_adapter(ours)
    reference.save_pretrained(tmp_path / "peft" / "init")  # PEFT's recipe: the initial adapter, before training
    mark_only_lora_trainable(ours)
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    x = x_tiny()
    for _ in range(3):
        run(ours, x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = run(ours, x).detach()
    assert not torch.allclose(trained, run(base, x), atol=1e-3), "training must have moved the model"

    save_adapter(ours, tmp_path / "pissa", config)
    save_adapter(ours, tmp_path / "plain", config, initial=initial)
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path / "pissa")  # re-runs the init on the original weights, then copies A, B
    torch.testing.assert_close(run(reloaded, x), trained, atol=1e-5, rtol=0)
    plain = copy.deepcopy(base)
    plain_config = load_adapter(plain, tmp_path / "plain")
    assert (plain_config.r, plain_config.alpha, plain_config.init) == (8, 16, "default")
    merge_lora(plain)  # onto the checkpoint's own weights
    torch.testing.assert_close(run(plain, x), trained, atol=1e-5, rtol=0)
    merge_lora(ours)  # onto the residual
    torch.testing.assert_close(run(ours, x), trained, atol=1e-5, rtol=0)

    # PEFT, given the same trained A and B, converts to the same plain adapter, key for key
    copy_into_peft(ours, reference)
    reference.save_pretrained(tmp_path / "peft" / "plain",
                              path_initial_model_for_weight_conversion=str(tmp_path / "peft" / "init"))
    theirs = load_file(tmp_path / "peft" / "plain" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(mine)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], atol=1e-6, rtol=0)
    for directory in ("plain", "pissa"):  # and PEFT reads both of ours back to the trained model
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / directory).eval()
        torch.testing.assert_close(run(loaded, x), trained, atol=1e-5, rtol=0)


def test_pissa_and_olora_refuse_an_nf4_base():
    from lora.quant import replace_with_nf4

    model = tiny_net(0).to(torch.bfloat16)
    replace_with_nf4(model, "layers.1.self_attn.q_proj")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    for init in ("pissa", "olora"):
        message = r"init '.*' on layers\.1\.self_attn\.q_proj: its base weight is 4-bit NF4. Initialise on the 16-bit"
        with pytest.raises(ValueError, match=message):
            inject_lora(model, LoRAConfig(r".*self_attn\.q_proj", r=2, init=init))
        assert not lora_layers(model), "refused before anything changed: layers.0 keeps its weight too"
        assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    inject_lora(model, LoRAConfig(r".*self_attn\.q_proj", r=2, init="gaussian"))  # leaves the base alone
