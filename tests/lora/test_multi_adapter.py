"""Several adapters in one model (lora/multi_adapter.py) against PEFT's multi-adapter PeftModel: loading by
name, switching, disabling, deleting, and add_weighted_adapter, exact where PEFT up to 0.21 was wrong (rsLoRA,
lora_bias: huggingface/peft#3761, fixed in PEFT 0.22)."""

import copy
import math

import peft
import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from lora import load_adapter, lora_layers, mark_only_lora_trainable, merge_lora, unmerge_lora
from lora import multi_adapter as ma
from lora.layer import LinearWithAdapters
from tests.lora_fixtures import peft_lora_modules, randomize_lora, run, tiny_net

DEFAULT_TARGETS = r".*self_attn\.(q|v)_proj"
B_TARGETS = r".*self_attn\.(q|k)_proj|head\.0"  # k_proj and head.0: layers only "b" adapts
PEFT_COMBINES_RIGHT = Version(peft.__version__) >= Version("0.22")  # huggingface/peft#3761: rsLoRA and lora_bias


def x_input() -> torch.Tensor:
    return torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(1))


def two_adapters(tmp_path, base=None, a=None, b=None, seed=6):
    """PEFT's model with adapters "default" and "b" (random weights), saved and loaded into ours by name."""
    base = tiny_net(0) if base is None else base
    a = dict(target_modules=DEFAULT_TARGETS, r=4, lora_alpha=8) | (a or {})
    b = dict(target_modules=B_TARGETS, r=4, lora_alpha=16) | (b or {})
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(**a))
    reference.add_adapter("b", LoraConfig(**b))
    randomize_lora(reference, seed=seed)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.3)
    reference.save_pretrained(tmp_path)  # "default" in tmp_path, "b" in tmp_path / "b"
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)
    ma.load_adapter(ours, tmp_path / "b", name="b")
    return base, ours, reference.eval()


def test_named_adapters_switch_as_in_peft(tmp_path):
    base, ours, reference = two_adapters(tmp_path)
    x = x_input()
    assert ma.adapter_names(ours) == ["default", "b"] and ma.active_adapter(ours) == "default"
    torch.testing.assert_close(run(ours, x), run(reference, x), atol=1e-6, rtol=0)
    ma.set_adapter(ours, "b")
    reference.set_adapter("b")
    out_b = run(ours, x)
    torch.testing.assert_close(out_b, run(reference, x), atol=1e-6, rtol=0)
    assert not torch.allclose(out_b, run(base, x), atol=1e-3)
    # the default adapter's layers and keys are untouched; b's own layers are LinearWithAdapters
    assert sorted(lora_layers(ours)) == [f"layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    assert type(ours.layers[0].self_attn.k_proj) is LinearWithAdapters and type(ours.head[0]) is LinearWithAdapters
    keys = set(ours.state_dict())
    q = "layers.0.self_attn.q_proj"
    assert {f"{q}.lora_A.weight", f"{q}.lora_adapters.b.lora_A.weight"} <= keys
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".lora_adapters.b." in n), "loaded frozen"
    ma.set_adapter(ours, "default")
    reference.set_adapter("default")
    torch.testing.assert_close(run(ours, x), run(reference, x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"no adapter 'c'; it has \['default', 'b'\]"):
        ma.set_adapter(ours, "c")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        ma.load_adapter(ours, tmp_path / "b", name="b")


def test_disable_adapters_gives_the_base_model_exactly(tmp_path):
    base, ours, _ = two_adapters(tmp_path)
    x = x_input()
    ma.set_adapter(ours, "b")
    with ma.disable_adapters(ours):
        assert ma.active_adapter(ours) is None
        assert torch.equal(run(ours, x), run(base, x))
    assert ma.active_adapter(ours) == "b"
    with pytest.raises(KeyError, match="inside"):
        with ma.disable_adapters(ours):
            raise KeyError("inside")
    assert ma.active_adapter(ours) == "b", "restored after an exception too"
    ma.set_adapter(ours, "default")
    merge_lora(ours)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        with ma.disable_adapters(ours):
            pass
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        ma.set_adapter(ours, "b")
    unmerge_lora(ours)
    ma.set_adapter(ours, "b")


def test_delete_adapter_restores_the_model(tmp_path):
    base, ours, _ = two_adapters(tmp_path)
    only_default = copy.deepcopy(base)
    load_adapter(only_default, tmp_path)
    k_weight = ours.layers[0].self_attn.k_proj.weight
    ma.set_adapter(ours, "b")
    ma.delete_adapter(ours, "b")
    assert ma.adapter_names(ours) == ["default"] and ma.active_adapter(ours) == "default"
    assert type(ours.layers[0].self_attn.k_proj) is nn.Linear and ours.layers[0].self_attn.k_proj.weight is k_weight
    assert set(ours.state_dict()) == set(only_default.state_dict())
    x = x_input()
    torch.testing.assert_close(run(ours, x), run(only_default, x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot be deleted"):
        ma.delete_adapter(ours, "default")
    with pytest.raises(ValueError, match="no adapter 'b'"):
        ma.delete_adapter(ours, "b")


def test_a_dora_adapter_loads_by_name(tmp_path):
    _, ours, reference = two_adapters(tmp_path, b=dict(use_dora=True))
    ma.set_adapter(ours, "b")
    reference.set_adapter("b")
    x = x_input()
    assert ours.layers[0].self_attn.k_proj.lora_adapters["b"].use_dora
    torch.testing.assert_close(run(ours, x), run(reference, x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cannot combine DoRA adapters.*not linear"):
        ma.add_weighted_adapter(ours, ["default", "b"], [1.0, 1.0], "mix", combination_type="cat")


def weighted_delta(layer, adapters, weights) -> torch.Tensor:
    """Σ wᵢ·sᵢ·BᵢAᵢ over the adapters this layer holds: what the combination must equal."""
    return sum(w * layer.delta_weight(a) for a, w in zip(adapters, weights) if layer.adapter(a) is not None)


WEIGHTS = [0.7, -0.4]


@pytest.mark.parametrize("combination_type", ["cat", "linear", "svd"])
def test_combinations_equal_peft_for_plain_lora(tmp_path, combination_type):
    _, ours, reference = two_adapters(tmp_path)
    svd_rank = 8 if combination_type == "svd" else None  # rank D is 8 where both adapt: svd then gives D itself
    settings = dict(combination_type=combination_type, svd_rank=svd_rank)
    ma.add_weighted_adapter(ours, ["default", "b"], WEIGHTS, "mix", **settings)
    reference.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", **settings)
    layers, ref_layers = ma.adapter_layers(ours), peft_lora_modules(reference)
    assert sorted(p for p, layer in layers.items() if "mix" in layer.lora_adapters) == sorted(ref_layers)
    for path, layer in layers.items():
        peft_delta = ref_layers[path].get_delta_weight("mix")
        torch.testing.assert_close(layer.delta_weight("mix"), peft_delta, atol=1e-6, rtol=0)
        if combination_type != "linear":  # cat, and svd at rank >= rank D, are the weighted sum itself
            torch.testing.assert_close(layer.delta_weight("mix"), weighted_delta(layer, ["default", "b"], WEIGHTS),
                                       atol=1e-6, rtol=0)
    ma.set_adapter(ours, "mix")
    reference.set_adapter("mix")
    x = x_input()
    torch.testing.assert_close(run(ours, x), run(reference, x), atol=1e-6, rtol=0)


def test_linear_is_not_the_weighted_sum_but_is_exact_for_one_adapter(tmp_path):
    _, ours, _ = two_adapters(tmp_path)
    ma.add_weighted_adapter(ours, ["default", "b"], WEIGHTS, "two", combination_type="linear")
    ma.add_weighted_adapter(ours, ["b"], [-0.3], "one", combination_type="linear")
    q = ours.layers[0].self_attn.q_proj
    exact = weighted_delta(q, ["default", "b"], WEIGHTS)
    assert not torch.allclose(q.delta_weight("two"), exact, atol=1e-3), "PEFT's linear has the cross terms BᵢAⱼ"
    torch.testing.assert_close(q.delta_weight("one"), -0.3 * q.delta_weight("b"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
def test_rslora_combination_is_exact_and_equals_peft_where_peft_is_fixed(tmp_path, combination_type):
    """huggingface/peft#3761: PEFT up to 0.21 folds each adapter's scaling into the factors, then gives the new
    adapter use_rslora from the first one, so its own scaling is r/√r = √r instead of 1. PEFT 0.22 sets
    use_rslora=False on the result: its update then equals ours. Either way ours is the exact weighted sum."""
    rs = dict(use_rslora=True)
    _, ours, reference = two_adapters(tmp_path, a=rs, b=rs | dict(target_modules=DEFAULT_TARGETS))
    adapters = ["default", "b"] if combination_type != "linear" else ["b"]
    weights = WEIGHTS[: len(adapters)]
    ma.add_weighted_adapter(ours, adapters, weights, "mix", combination_type=combination_type)
    reference.add_weighted_adapter(adapters, weights, "mix", combination_type=combination_type)
    new_rank = {"cat": 8, "svd": 4, "linear": 4}[combination_type]
    peft_factor = 1.0 if PEFT_COMBINES_RIGHT else math.sqrt(new_rank)
    ref_layers = peft_lora_modules(reference)
    for path, layer in lora_layers(ours).items():
        ours_delta, peft_delta = layer.delta_weight("mix"), ref_layers[path].get_delta_weight("mix")
        if combination_type != "svd":  # rank-4 svd of a rank-8 sum is an approximation, in both
            torch.testing.assert_close(ours_delta, weighted_delta(layer, adapters, weights), atol=1e-6, rtol=0)
        torch.testing.assert_close(peft_delta, peft_factor * ours_delta, atol=1e-5, rtol=1e-5)


def test_svd_is_the_best_rank_k_approximation(tmp_path):
    _, ours, _ = two_adapters(tmp_path, b=dict(target_modules=DEFAULT_TARGETS, r=2, use_rslora=True))
    ma.add_weighted_adapter(ours, ["default", "b"], WEIGHTS, "low", combination_type="svd", svd_rank=3)
    for layer in lora_layers(ours).values():
        exact = weighted_delta(layer, ["default", "b"], WEIGHTS)
        singular = torch.linalg.svdvals(exact)
        assert layer.lora_adapters["low"].r == 3 and singular[3] > 1e-4, "rank D = 6 > 3: a real approximation"
        error = torch.linalg.matrix_norm(exact - layer.delta_weight("low"))
        torch.testing.assert_close(error, singular[3:].square().sum().sqrt(), atol=1e-5, rtol=1e-5)  # Eckart-Young


@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")  # PEFT takes lora_B.bias for a DeepSpeed shard
def test_cat_with_different_ranks_scalings_and_lora_bias_is_the_weighted_sum_of_outputs(tmp_path):
    """One Linear: the output change is linear in the update, so cat's must be Σ wᵢ·(yᵢ - y_base) exactly."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5))
    a = dict(target_modules="0", r=3, lora_alpha=5, lora_bias=True)
    _, ours, reference = two_adapters(tmp_path, base=base, a=a, b=dict(target_modules="0", r=2, lora_alpha=7,
                                                                       use_rslora=True))
    x = x_input()
    y_base = base(x)
    with torch.no_grad():
        outputs = []
        for name in ("default", "b"):
            ma.set_adapter(ours, name)
            outputs.append(ours(x) - y_base)
        ma.add_weighted_adapter(ours, ["default", "b"], WEIGHTS, "mix", combination_type="cat")
        ma.set_adapter(ours, "mix")
        assert ours[0].lora_adapters["mix"].r == 5 and ours[0].lora_adapters["mix"].scaling == 1.0
        expected = WEIGHTS[0] * outputs[0] + WEIGHTS[1] * outputs[1]
        torch.testing.assert_close(ours(x) - y_base, expected, atol=1e-6, rtol=0)
        reference.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type="cat")
        reference.set_adapter("mix")
        if PEFT_COMBINES_RIGHT:  # PEFT 0.22 combines the biases and gives the result scaling 1, as here
            torch.testing.assert_close(reference(x) - y_base, expected, atol=1e-5, rtol=1e-5)
        else:  # PEFT up to 0.21 drops the bias part of the update
            assert not torch.allclose(reference(x) - y_base, expected, atol=1e-3)


def test_combination_errors_are_named(tmp_path):
    _, ours, _ = two_adapters(tmp_path, b=dict(r=2))
    with pytest.raises(ValueError, match="needs equal ranks"):
        ma.add_weighted_adapter(ours, ["default", "b"], WEIGHTS, "mix", combination_type="linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        ma.add_weighted_adapter(ours, ["default", "b"], [1.0], "mix")
    with pytest.raises(ValueError, match="no adapter 'c'"):
        ma.add_weighted_adapter(ours, ["default", "c"], WEIGHTS, "mix")
    with pytest.raises(ValueError, match="not one of"):
        ma.add_weighted_adapter(ours, ["default", "b"], WEIGHTS, "mix", combination_type="ties")
    with pytest.raises(ValueError, match="taken"):
        ma.add_weighted_adapter(ours, ["default", "b"], WEIGHTS, "b")
    assert ma.adapter_names(ours) == ["default", "b"], "nothing was added"


def peft_name(ours_name: str) -> str:
    """Our parameter name as PEFT spells it: base_model.model.<path>.<part>.<adapter>[.weight|.bias] (DoRA's
    magnitude is a module's weight in PEFT, a bare Parameter here)."""
    if ".lora_adapters." in ours_name:  # <path>.lora_adapters.<adapter>.<part>[.tail]
        path, _, rest = ours_name.partition(".lora_adapters.")
        adapter, _, part = rest.partition(".")
    else:  # the default adapter: <path>.<part>[.tail]
        path, _, part = ours_name.partition(".lora_")
        adapter, part = "default", "lora_" + part
    which, _, tail = part.partition(".")
    tail = "weight" if which == "lora_magnitude_vector" else tail
    return f"base_model.model.{path}.{which}.{adapter}" + (f".{tail}" if tail else "")


@pytest.mark.parametrize("adapter", ["default", "b"])
def test_mark_only_lora_trainable_trains_one_adapter_as_peft(tmp_path, adapter):
    """PEFT trains its active adapter only; a suffix match on lora_A/lora_B would also train the other one."""
    _, ours, reference = two_adapters(tmp_path, b=dict(use_dora=True))
    reference.set_adapter(adapter)  # PEFT: the active adapter's parameters require grad, the others do not
    n_trainable = mark_only_lora_trainable(ours, adapter=adapter)
    ours_trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    peft_trained = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert {peft_name(n) for n in ours_trained} == peft_trained and ours_trained
    assert n_trainable == sum(p.numel() for p in reference.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=r"no adapter 'c' to train; it has \['default', 'b'\]"):
        mark_only_lora_trainable(ours, adapter="c")


@pytest.mark.parametrize("b", [{}, dict(use_dora=True)], ids=["lora", "dora"])
def test_merge_lora_merges_the_active_named_adapter_everywhere_as_peft(tmp_path, b):
    """b adapts k_proj and head.0, which only named adapters reach (LinearWithAdapters): they merge too."""
    base, ours, reference = two_adapters(tmp_path, b=b)
    ma.set_adapter(ours, "b")
    reference.set_adapter("b")
    x = x_input()
    expected = run(ours, x)
    merged = merge_lora(ours)
    reference.merge_adapter()
    assert {"layers.0.self_attn.k_proj", "head.0"} <= set(merged)
    ref_layers = peft_lora_modules(reference)
    for path, layer in ma.adapter_layers(ours).items():
        torch.testing.assert_close(layer.weight, ref_layers[path].base_layer.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(ours, x), expected, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(ours)
    unmerge_lora(ours)
    base_weights = dict(base.named_parameters())
    for path, layer in ma.adapter_layers(ours).items():
        torch.testing.assert_close(layer.weight, base_weights[f"{path}.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(ours, x), expected, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(ours)
    with ma.disable_adapters(ours), pytest.raises(RuntimeError, match="adapters are disabled"):
        merge_lora(ours)


SAVE_CASES = {  # (settings of "default", settings of "b", adapter saved: "b" itself or a combination "mix")
    "rslora-cat": (dict(use_rslora=True), dict(use_rslora=True, target_modules=DEFAULT_TARGETS), "cat"),
    "bias-cat": (dict(lora_bias=True), {}, "cat"),  # mix has a bias on q/v, none on k/head.0: saved as zeros
    "patterns": ({}, dict(rank_pattern={"k_proj": 2}, alpha_pattern={r"head\.0": 3}), "b"),
    "dora": ({}, dict(use_dora=True), "b"),
}


@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")  # PEFT takes lora_B.bias for a DeepSpeed shard
@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # k_proj has no base bias to merge into, in PEFT too
@pytest.mark.parametrize("case", SAVE_CASES)
def test_a_named_or_combined_adapter_saves_in_peft_format(tmp_path, case):
    a, b, saved = SAVE_CASES[case]
    base, ours, reference = two_adapters(tmp_path / "peft", a=a, b=b)
    name = "b" if saved == "b" else "mix"
    if saved == "cat":
        ma.add_weighted_adapter(ours, ["default", "b"], WEIGHTS, "mix", combination_type="cat")
    out = ma.save_adapter(ours, tmp_path / "ours", name)
    assert out == tmp_path / "ours" / name, "PEFT's save_pretrained(selected_adapters=[name]) layout"
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.") and f".{name}." not in k for k in keys)
    if saved == "b":  # the very tensors PEFT wrote for b
        ours_file = load_file(out / "adapter_model.safetensors")
        peft_file = load_file(tmp_path / "peft" / "b" / "adapter_model.safetensors")
        assert ours_file.keys() == peft_file.keys()
        assert all(torch.equal(ours_file[k], peft_file[k]) for k in ours_file)
    ma.set_adapter(ours, name)
    x = x_input()
    expected = run(ours, x)
    assert not torch.allclose(expected, run(base, x), atol=1e-3)
    from_peft = PeftModel.from_pretrained(copy.deepcopy(base), out, adapter_name=name).eval()
    torch.testing.assert_close(run(from_peft, x), expected, atol=1e-6, rtol=0)
    reference.load_adapter(out, adapter_name="saved")
    reference.set_adapter("saved")
    torch.testing.assert_close(run(reference, x), expected, atol=1e-6, rtol=0)
    back = copy.deepcopy(base)
    ma.load_adapter(back, out, name=name)
    ma.set_adapter(back, name)
    torch.testing.assert_close(run(back, x), expected, atol=1e-6, rtol=0)


def test_saving_names_what_is_wrong(tmp_path):
    _, ours, _ = two_adapters(tmp_path)
    with pytest.raises(ValueError, match=r"lora\.save_adapter\(model, out_dir, config\)"):
        ma.save_adapter(ours, tmp_path / "out", "default")
    with pytest.raises(ValueError, match=r"no adapter 'c' to save; it has \['default', 'b'\]"):
        ma.save_adapter(ours, tmp_path / "out", "c")
    ours.layers[0].self_attn.q_proj.lora_adapters["b"].lora_dropout = nn.Dropout(0.3)
    with pytest.raises(ValueError, match=r"one dropout per adapter.*layers\.0\.self_attn\.q_proj has 0\.3"):
        ma.save_adapter(ours, tmp_path / "out", "b")
    assert not (tmp_path / "out" / "b").exists(), "nothing written"
