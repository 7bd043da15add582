"""lora.diagnose on failures built on purpose, one per check, and on a healthy model."""

import copy

import torch
from torch import nn

from lora import LoRAConfig, inject_lora, mark_only_lora_trainable
from lora.diagnose import blame_nonfinite, diagnose, first_nonfinite_module
from tests.lora_fixtures import TinyNet, randomize_lora


class Dual(nn.Module):
    """A tower with LoRA, a projection head, and an optional second path: the shapes of the bugs users meet."""

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
    assert first_nonfinite_module(model, lambda m: m(bad_input).sum()) == (
        "the batch itself holds NaN/inf: the input of the model (Dual), rows 0, 1")


class Log(nn.Module):
    """A leaf module whose own computation goes NaN on negative input."""

    def forward(self, x):
        return torch.log(x)


class Parent(nn.Module):
    """Two children with a functional op between, after or before them, chosen by `op_at`."""

    def __init__(self, op_at: str = "none"):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.log = nn.Linear(4, 4), nn.Linear(4, 4), Log()
        self.op_at = op_at

    def forward(self, x):
        if self.op_at == "before":
            x = x / 0.0 * 0.0  # 0/0 = NaN before any child ran
        h = self.a(x)
        if self.op_at == "between":
            h = h / torch.zeros_like(h)  # x/0: inf and NaN, made in this forward, not by a or b
        if self.op_at == "child":
            h = self.log(-h.abs() - 1)  # the child Log makes the NaN
        h = self.b(h)
        if self.op_at == "after":
            h = torch.log(-h.abs() - 1)  # log of a negative number, after the last child
        return h


class Outer(nn.Module):
    def __init__(self, op_at: str = "none"):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.block = Parent(op_at)

    def forward(self, x):
        return self.block(self.stem(x))


X = torch.randn(7, 4, generator=torch.Generator().manual_seed(3))


def loss_of(x):
    return lambda model: model(x).square().mean()


def test_blame_a_child_module_that_makes_the_nan():
    blame = blame_nonfinite(Outer("child"), loss_of(X))
    assert (blame.kind, blame.module, blame.rows) == ("module", "block.log", [])
    assert blame.message == "block.log (Log)"


def test_blame_a_functional_op_between_children():
    blame = blame_nonfinite(Outer("between"), loss_of(X))
    assert (blame.kind, blame.module, blame.after) == ("inside", "block", "block.a")
    assert blame.message.startswith("inside the forward of block (Parent), after its child block.a: "
                                    "an operation between modules")
    assert "reaches block.b (Linear)" in blame.message  # b received it; b is not blamed


def test_blame_a_functional_op_after_the_last_child_and_before_the_first():
    blame = blame_nonfinite(Outer("after"), loss_of(X))
    assert (blame.kind, blame.module, blame.after) == ("inside", "block", "block.b")
    assert blame.message.startswith("inside the forward of block (Parent), after its child block.b:")
    blame = blame_nonfinite(Outer("before"), loss_of(X))
    assert (blame.kind, blame.module, blame.after) == ("inside", "block", None)
    assert "inside the forward of block (Parent), before any of its children returned" in blame.message


def test_blame_a_softmax_overflow_inside_attention_not_the_projection():
    model = build()
    attn = model.tower.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj):  # finite but huge: q @ k^T overflows, softmax gives NaN
        proj.register_forward_hook(lambda m, args, out: out * 1e25)
    blame = blame_nonfinite(model, step)
    assert (blame.kind, blame.module, blame.after) == ("inside", "tower.layers.0.self_attn",
                                                       "tower.layers.0.self_attn.v_proj")
    assert "reaches tower.layers.0.self_attn.out_proj" in blame.message


def test_blame_names_the_rows_of_the_batch_holding_inf():
    x = X.clone()
    x[2, 1] = float("inf")
    x[5, 3] = float("-inf")
    mask = torch.ones(7, dtype=torch.bool)
    blame = blame_nonfinite(Outer(), loss_of(x), {"features": x, "frame_mask": mask})
    assert (blame.kind, blame.rows) == ("batch", [2, 5])
    assert blame.message == "the batch itself holds NaN/inf in rows 2, 5 ('features' rows 2, 5)"
    blame = blame_nonfinite(Outer(), loss_of(x))  # no batch given: the model's input says the same
    assert (blame.kind, blame.rows, blame.module) == ("batch", [2, 5], "")


def test_blame_the_step_function_outside_every_module():
    model = Outer()
    blame = blame_nonfinite(model, lambda m: m.block(m.stem(X) / 0.0).sum())  # between two top-level calls
    assert (blame.kind, blame.after) == ("step", "stem (Linear)")
    assert "in the step function, outside every module, after stem (Linear)" in blame.message
    blame = blame_nonfinite(model, lambda m: m(X.log()).sum(), {"features": X})  # the batch given is clean
    assert blame.kind == "step" and "the step function made it before calling the model" in blame.message
    blame = blame_nonfinite(model, lambda m: m(X).sum() * float("inf"))
    assert blame.kind == "loss" and blame.message == "the loss computation itself (every module output was finite)"


def test_blame_on_a_finite_step_and_the_rng_is_left_as_it_was():
    model = build()  # dropout 0.1 on the LoRA branch draws random numbers in the re-run
    rng = torch.get_rng_state()
    blame = blame_nonfinite(model, step)
    assert not blame.found and blame.kind == "finite" and "backward pass" in blame.message
    assert torch.equal(torch.get_rng_state(), rng)
    assert first_nonfinite_module(model, step) is None


def test_blame_treats_a_lora_layer_as_one_linear():
    model = build()
    randomize_lora(model)
    with torch.no_grad():
        model.tower.layers[1].self_attn.q_proj.weight[0, 0] = float("inf")  # the frozen base weight
    blame = blame_nonfinite(model, step)
    assert (blame.kind, blame.module) == ("module", "tower.layers.1.self_attn.q_proj")


def test_blame_inside_the_audio_encoders_attention_on_an_sdpa_overflow():
    from models.qwen2_audio_encoder import Qwen2AudioEncoder, Qwen2AudioEncoderConfig

    torch.manual_seed(0)
    encoder = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(num_mel_bins=8, d_model=16, encoder_layers=2,
                                                        encoder_attention_heads=2, encoder_ffn_dim=32,
                                                        max_source_positions=8))
    attn = encoder.layers[1].self_attn
    for proj in (attn.q_proj, attn.k_proj):  # finite but huge: the scores inside scaled_dot_product_attention overflow
        proj.register_forward_hook(lambda m, args, out: out * 1e25)
    features = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(0))
    blame = blame_nonfinite(encoder, lambda m: m(features).square().mean(), {"features": features})
    assert (blame.kind, blame.module, blame.after) == ("inside", "layers.1.self_attn", "layers.1.self_attn.v_proj")
    assert blame.message.startswith("inside the forward of layers.1.self_attn (SelfAttention), after its child "
                                    "layers.1.self_attn.v_proj")
    assert blame.message.endswith("reaches layers.1.self_attn.out_proj (Linear)")
