"""PEFT's LoRA variants against PEFT 0.21.2 on the same base weights: per-module rank/alpha, lora_bias,
LoRA+ and all-linear (the initialisations: test_lora_init.py)."""

import contextlib
import copy

import pytest
import torch

from lora import LoRAConfig, inject_lora, lora_layers, mark_only_lora_trainable, merge_lora
from lora.config import pattern_key
from lora.inject import all_linear_paths, expand_targets
from engine.training import param_groups
from tests.lora_fixtures import peft_lora_modules, randomize_lora, run, tiny_net, tiny_qwen2_audio_encoder

TARGETS = r".*self_attn\.(q|k|v)_proj|head\.0"


def x_tiny():
    return torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(1))


def peft_config(config: LoRAConfig, **extra):
    """PEFT's LoraConfig with the same settings as ours."""
    from peft import LoraConfig

    patterns = config.patterns
    return LoraConfig(target_modules=patterns[0] if len(patterns) == 1 else "|".join(f"(?:{p})" for p in patterns),
                      r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.rslora,
                      rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern),
                      lora_bias=config.lora_bias, init_lora_weights=True if config.init == "default" else config.init,
                      **extra)


def pair(config: LoRAConfig, base=None, seed=0):
    """Ours and PEFT's over copies of one base, each injected under the same torch seed."""
    from peft import get_peft_model

    base = tiny_net(0) if base is None else base
    torch.manual_seed(seed)
    ours = copy.deepcopy(base)
    inject_lora(ours, config)
    torch.manual_seed(seed)
    reference = get_peft_model(copy.deepcopy(base), peft_config(config))
    return base, ours, reference


def copy_into_peft(ours, reference):
    layers = lora_layers(ours)
    with torch.no_grad():
        for path, ref in peft_lora_modules(reference).items():
            ref.lora_A["default"].weight.copy_(layers[path].lora_A.weight)
            ref.lora_B["default"].weight.copy_(layers[path].lora_B.weight)
            if layers[path].lora_B.bias is not None:
                ref.lora_B["default"].bias.copy_(layers[path].lora_B.bias)


def assert_same_grads(ours, reference):
    refs = peft_lora_modules(reference)
    for path, layer in lora_layers(ours).items():
        for name in layer.adapter_params():
            which, _, tensor = name.partition(".")
            theirs = getattr(getattr(refs[path], which)["default"], tensor).grad
            torch.testing.assert_close(layer.get_parameter(name).grad, theirs, atol=1e-6, rtol=1e-5)
            assert layer.get_parameter(name).grad.abs().sum() > 0, f"{path}.{name} got no gradient"


@pytest.mark.parametrize("path", ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "head.0", "xq_proj",
                                  "a.q_proj.b"])
def test_pattern_key_is_peft_get_pattern_key(path):
    from peft.utils.other import get_pattern_key

    keys = ["^layers\\.0\\..*", "q_proj", "proj", "head.0", "layers\\.1\\..*"]
    expected = get_pattern_key(keys, path)
    assert pattern_key(keys, path) == (None if expected == path and path not in keys else expected)


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_pattern_equal_peft(rslora):
    # overlapping keys: layers.1's q_proj takes the first that applies ('q_proj'), as in PEFT
    config = LoRAConfig(TARGETS, r=4, alpha=8, rslora=rslora, rank_pattern={"q_proj": 2, r"layers\.1\..*": 6},
                        alpha_pattern={"head.0": 3, "^layers\\.0\\.self_attn\\.k_proj": 5})
    base, ours, reference = pair(config)
    refs = peft_lora_modules(reference)
    shapes = {path: (layer.r, layer.alpha, layer.scaling) for path, layer in lora_layers(ours).items()}
    assert shapes == {p: (m.r["default"], m.lora_alpha["default"], m.scaling["default"]) for p, m in refs.items()}
    assert shapes["layers.1.self_attn.q_proj"][0] == 2 and shapes["layers.1.self_attn.v_proj"][0] == 6
    assert shapes["layers.0.self_attn.k_proj"][1] == 5 and shapes["head.0"][1] == 3
    randomize_lora(ours, seed=3)
    copy_into_peft(ours, reference)
    mark_only_lora_trainable(ours)
    x = x_tiny()
    out, out_ref = run(ours, x), run(reference, x)
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=0)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weights).sum().backward()
    (out_ref * weights).sum().backward()
    assert_same_grads(ours, reference)
    merge_lora(ours)
    merged = dict(reference.merge_and_unload().named_modules())
    for path, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.weight, merged[path].weight, atol=1e-6, rtol=0)


def test_a_pattern_key_that_applies_nowhere_is_an_error():
    with pytest.raises(ValueError, match=r"rank_pattern key 'o_proj' applies to none of the 7 targeted layers"):
        inject_lora(tiny_net(0), LoRAConfig(TARGETS, rank_pattern={"o_proj": 2}))
    with pytest.raises(ValueError, match="positive integer rank"):
        LoRAConfig(TARGETS, rank_pattern={"q_proj": 0})


def test_lora_bias_forward_backward_merge_equal_peft():
    config = LoRAConfig(r".*self_attn\.(q|v)_proj|head\.0", r=4, alpha=8, lora_bias=True)
    base, ours, reference = pair(config)
    randomize_lora(ours, seed=4)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B.bias.copy_(torch.randn(layer.out_features, generator=torch.Generator().manual_seed(5)))
    copy_into_peft(ours, reference)
    mark_only_lora_trainable(ours)
    assert all(p.requires_grad for n, p in ours.named_parameters() if n.endswith("lora_B.bias"))
    x = x_tiny()
    out, out_ref = run(ours, x), run(reference, x)
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=0)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    assert_same_grads(ours, reference)
    merge_lora(ours)
    torch.testing.assert_close(run(ours, x), out, atol=1e-5, rtol=0)
    merged = dict(reference.merge_and_unload().named_modules())
    for path, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.bias, merged[path].bias, atol=1e-6, rtol=0)


def test_lora_bias_on_a_bias_free_layer_refuses_to_merge():
    model = tiny_net(0)
    inject_lora(model, LoRAConfig(r".*k_proj", lora_bias=True))  # Whisper-like: the key projection has no bias
    with pytest.raises(RuntimeError, match="lora_bias"):
        merge_lora(model)


def test_lora_plus_groups_equal_peft():
    from peft.optimizers import create_loraplus_optimizer

    config = LoRAConfig(r".*self_attn\.(q|v)_proj|head\.0", r=4, alpha=8, lora_bias=True)
    base, ours, reference = pair(config)
    also = ["layers.0.norm", "head.2", "logit_scale"]
    mark_only_lora_trainable(ours, also=also)
    for name, param in reference.named_parameters():  # the same tensors trainable in PEFT's model
        plain = name.removeprefix("base_model.model.").replace(".default", "")
        param.requires_grad_(".lora_" in name or any(plain == a or plain.startswith(a + ".") for a in also))
    lr, ratio, decay = 1e-3, 16.0, 0.05
    optimizer = create_loraplus_optimizer(reference, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                          loraplus_weight_decay=decay)
    peft_names = {id(p): n.removeprefix("base_model.model.").replace(".default", "")
                  for n, p in reference.named_parameters()}
    our_names = {id(p): n for n, p in ours.named_parameters()}
    theirs = [(sorted(peft_names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
              for g in optimizer.param_groups if g["params"]]
    mine = [(sorted(our_names[id(p)] for p in g["params"]), lr * g["lr_scale"], g["weight_decay"])
            for g in param_groups(ours, decay, lora_plus_ratio=ratio) if g["params"]]
    assert mine == theirs
    assert any("lora_B.bias" in n for n in mine[-1][0]) and "layers.0.norm.weight" in mine[-1][0]
    # without the ratio, the groups are the toolkit's own (no LoRA+ learning rates)
    assert all("lr_scale" not in g for g in param_groups(ours, decay))


def test_lora_plus_step_through_train_step_equals_peft():
    """train_step puts each group's lr_scale on the scheduled rate: one AdamW step equals PEFT's LoRA+ optimizer's."""
    from peft.optimizers import create_loraplus_optimizer

    from engine.training import StepEnv, WarmupCosine, train_step

    config = LoRAConfig(r".*self_attn\.(q|v)_proj", r=4, alpha=8)
    _, ours, reference = pair(config)
    randomize_lora(ours, seed=3)
    copy_into_peft(ours, reference)
    mark_only_lora_trainable(ours)
    x, lr = x_tiny(), 1e-2

    class Task:
        min_examples = 1

        def forward_backward(self, model, micro_batches, env):
            loss = run(model, micro_batches[0]["x"]).square().mean()
            loss.backward()
            return loss.detach()

    optimizer = torch.optim.AdamW(param_groups(ours, 0.1, lora_plus_ratio=8.0), lr=lr, fused=True)
    env = StepEnv(torch.device("cpu"), lambda: contextlib.nullcontext(), lambda loss: loss.backward())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    schedule = WarmupCosine(lr, 0, 10, env.device)  # no warmup: the first step runs at the peak, lr
    train_step(Task(), ours, [{"index": torch.arange(3), "x": x}], optimizer, schedule, scaler, env, 0.0)
    theirs = create_loraplus_optimizer(reference, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=8.0,
                                       loraplus_weight_decay=0.1)
    run(reference, x).square().mean().backward()
    theirs.step()
    refs = peft_lora_modules(reference)
    for path, layer in lora_layers(ours).items():
        for ab in ("lora_A", "lora_B"):
            theirs_weight = getattr(refs[path], ab)["default"].weight
            torch.testing.assert_close(getattr(layer, ab).weight, theirs_weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_name", ["tiny_net", "qwen2_audio", "t5", "llama"])
def test_all_linear_selects_what_peft_selects(model_name):
    import transformers
    from peft import LoraConfig, get_peft_model

    ours = None
    if model_name == "tiny_net":
        model = tiny_net(0)
    elif model_name == "qwen2_audio":
        model = tiny_qwen2_audio_encoder(0)[0]
    elif model_name == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, decoder_start_token_id=0))
    else:
        from models.llama import LlamaConfig, LlamaForCausalLM

        hf = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
        ours = LlamaForCausalLM(LlamaConfig.from_hf(dict(hf, model_type="llama")))  # our port, HF's module names
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules="all-linear", r=2))
    expected = sorted(reference.peft_config["default"].target_modules)
    assert sorted(all_linear_paths(model)) == expected
    if ours is not None:
        assert sorted(all_linear_paths(ours)) == expected and "lm_head" not in expected
    injected = inject_lora(copy.deepcopy(model), LoRAConfig(expand_targets(model, ["all-linear"]), r=2))
    assert sorted(injected) == sorted(peft_lora_modules(reference)) == expected


def test_all_linear_is_expanded_before_injection_and_can_exclude_heads():
    model = tiny_net(0)
    with pytest.raises(ValueError, match="expand_targets"):
        inject_lora(model, LoRAConfig("all-linear"))
    assert not {"head.0", "head.2"} & set(all_linear_paths(model, exclude=["head"]))
    assert expand_targets(model, [r".*q_proj", "ALL-LINEAR"])[0] == r".*q_proj"
    assert len(expand_targets(model, "all-linear")) == len(all_linear_paths(model)) == 1 + 2 * 6 + 2
