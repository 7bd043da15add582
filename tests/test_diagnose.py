"""lora.diagnose on failures built on purpose, one per check, and on a healthy model."""

import copy

import torch
from torch import nn

from lora import LoRAConfig, inject_lora, mark_only_lora_trainable
from lora.diagnose import diagnose, first_nonfinite_module
from tests.lora_fixtures import TinyNet, randomize_lora


class Dual(nn.Module):
    """A tower with LoRA, a projection head, and an optional second path: the shapes of the seeds' bugs."""

    def __init__(self, mode: str = "healthy"):
        super().__init__()
        torch.manual_seed(0)
        self.tower = TinyNet()
        self.tower_copy = copy.deepcopy(self.tower)  # only used by the "copy" bug
        self.unused = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))  # like a language model this task never calls
        self.proj = nn.Linear(5, 3)
        self.mode = mode

    def forward(self, x):
        if self.mode == "copy":
            hidden = self.tower_copy(x)  # reaches the encoder through the un-injected copy
        elif self.mode == "no_grad":
            with torch.no_grad():
                hidden = self.tower(x)
        else:
            hidden = self.tower(x)
        if self.mode == "detach":
            hidden = hidden.detach()
        return self.proj(hidden)


def build(mode="healthy", targets=r"tower\.layers\.\d+\.self_attn\.(q|v)_proj"):
    model = Dual(mode)
    inject_lora(model, LoRAConfig(targets, r=2, alpha=4, dropout=0.1))
    mark_only_lora_trainable(model, also=["proj"])
    model.train()
    return model


def step(model):
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
    return model(x).square().mean()


def failed(report):
    return [number for number, check in enumerate(report.checks, 1) if not check.ok]


def test_healthy_model_passes_and_state_is_restored():
    model = build()
    for p in model.parameters():
        p.grad = None
    model.tower.layers[0].norm.eval()  # a mixed mode state (outside LoRA) that must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    report = diagnose(model, step)
    assert report.ok, str(report)
    assert all(p.grad is None for p in model.parameters())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert "4 LoRA layers: 4 in tower" in str(report)


def test_forward_through_an_uninjected_copy():
    report = diagnose(build("copy"), step)
    assert failed(report) == [5, 6, 7]
    text = str(report)
    assert "never called: tower.layers.{0..1}.self_attn.{q,v}_proj" in text
    assert "second, un-injected copy" in text and "tower_copy" in text


def test_targets_on_a_submodule_the_task_never_calls():
    report = diagnose(build(targets=r"unused\.\d"), step)
    assert 7 in failed(report)
    assert "2 LoRA layers in `unused` never ran in this task's forward" in str(report)


def test_frozen_lora():
    model = build()
    model.tower.layers[1].self_attn.v_proj.lora_B.weight.requires_grad_(False)
    report = diagnose(model, step)
    assert 3 in failed(report) and 6 in failed(report)
    assert "frozen: tower.layers.1.self_attn.v_proj.lora_B.weight" in str(report)
    assert "no gradient (1 parameters): tower.layers.1.self_attn.v_proj (lora_B)" in str(report)


def test_eval_mode():
    model = build()
    model.eval()
    report = diagnose(model, step)
    assert failed(report) == [4]
    assert "in eval mode: tower.layers.{0..1}.self_attn.{q,v}_proj" in str(report)
    assert not model.training, "diagnose must restore eval mode"


def test_no_grad_inside_the_encoder():
    report = diagnose(build("no_grad"), step)
    assert 5 in failed(report) and 6 in failed(report)
    assert "outputs do not require grad (a torch.no_grad()" in str(report)


def test_detach_before_the_projection():
    report = diagnose(build("detach"), step)
    assert 6 in failed(report) and 7 in failed(report)
    assert "`tower` returns a tensor that requires grad, but the next module called, `proj`" in str(report)


def test_zero_lora_a_gradient_at_init_is_not_a_failure_but_non_finite_is():
    model = build()
    assert diagnose(model, step).ok  # B = 0: lora_A's gradient is exactly zero, and that is fine
    randomize_lora(model)
    with torch.no_grad():
        model.tower.layers[0].self_attn.q_proj.lora_A.weight[0, 0] = float("inf")
    report = diagnose(model, step)
    assert 6 in failed(report) and "non-finite gradient" in str(report)


def test_first_nonfinite_module_names_where_nan_starts():
    model = build()
    model.tower.layers[1].fc2.register_forward_hook(lambda m, args, out: out * float("nan"))
    assert first_nonfinite_module(model, step) == "tower.layers.1.fc2 (Linear)"
    assert first_nonfinite_module(build(), step) is None


def test_first_nonfinite_module_blames_the_data_when_the_input_is_bad():
    model = build()
    bad_input = torch.full((2, 3, 6), float("nan"))
    assert first_nonfinite_module(model, lambda m: m(bad_input).sum()).startswith("the input of tower.embed (Linear)")
