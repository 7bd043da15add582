"""What a decoder layer keeps for backward (models/swiglu.py, models/attention.py SharedMask): SwiGLU keeps
gate and up, not silu(gate) too, and one additive mask serves every layer, instead of SDPA's own float copy of
the boolean mask per layer. Both change memory only: outputs and gradients are the same bits (the same
operations, so bit equality holds by construction)."""

import pytest
import torch
import torch.nn.functional as F

import models.llama
import models.swiglu
from models.attention import SharedMask, attend, attention_mask_and_positions
from models.swiglu import silu_mul
from tests.models.test_lm_loss import prompt_answer_batch, tiny_lm

INTERMEDIATE = 48  # tiny_lm's intermediate_size, no other dimension's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_gives_autograds_output_and_gradients_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(3, 5, 7, generator=generator).to(dtype) * 3 for _ in range(3))
    results = []
    for fn in (silu_mul, lambda g, u: F.silu(g) * u):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        y = fn(g, u)
        y.backward(grad)
        results.append((y, g.grad, u.grad))
    for ours, plain in zip(*results, strict=True):
        assert ours.dtype == dtype and torch.equal(ours, plain)


def test_silu_mul_passes_only_the_gradients_asked_for_and_skips_the_function_without_autograd(monkeypatch):
    gate, up = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    silu_mul(gate, up).sum().backward()
    assert gate.grad is not None and up.grad is None

    def refuse(*args):
        raise AssertionError("no graph to build: the plain expression should have run")

    monkeypatch.setattr(models.swiglu._SiluMul, "apply", refuse)
    with torch.no_grad():
        torch.testing.assert_close(silu_mul(gate, up), F.silu(gate) * up, rtol=0, atol=0)
    silu_mul(gate.detach(), up)  # nothing requires grad


def test_a_shared_mask_is_the_boolean_mask_bit_for_bit():
    generator = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # a left-padded row
    allowed, _ = attention_mask_and_positions(mask, 2, 0, 6, "cpu")
    q = torch.randn(2, 4, 6, 8, generator=generator)
    k, v, grad = torch.randn(2, 2, 6, 8, generator=generator), torch.randn(2, 2, 6, 8, generator=generator), None
    results = []
    for m in (allowed, SharedMask(allowed)):
        leaf = q.clone().requires_grad_()
        y = attend(leaf, k, v, m, dropout=0.0)
        grad = torch.randn(y.shape, generator=generator) if grad is None else grad
        y.backward(grad)
        results.append((y, leaf.grad))
    for ours, plain in zip(*results, strict=True):  # SDPA turns a boolean mask into this very float mask first,
        assert torch.equal(ours, plain)              # then runs one kernel on the same inputs: equal on any CPU


def kept_storages(model, shape_test) -> int:
    """How many distinct storages autograd keeps, over the whole model, among tensors whose shape passes;
    the weights (kept by every matmul, no memory of their own) left out."""
    input_ids, mask, labels = prompt_answer_batch()
    storages, weights = set(), {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        if shape_test(tuple(tensor.shape)) and tensor.untyped_storage().data_ptr() not in weights:
            storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    return len(storages)


def test_each_layer_keeps_two_swiglu_activations_and_all_share_one_mask(monkeypatch):
    model = tiny_lm(tied=False)  # 2 layers, 12 tokens
    intermediate = lambda shape: shape[-1] == INTERMEDIATE  # noqa: E731
    square_mask = lambda shape: len(shape) == 4 and shape[1:] == (1, 12, 12)  # noqa: E731
    assert kept_storages(model, intermediate) == 2 * 2, "gate and up of each layer"
    assert kept_storages(model, square_mask) == 1, "one mask for both layers"
    # the detectors see what autograd keeps without them: silu(gate) too, and a converted mask per layer
    monkeypatch.setattr(models.llama, "silu_mul", lambda gate, up: F.silu(gate) * up)
    monkeypatch.setattr(models.llama, "SharedMask", lambda allowed: allowed)
    assert kept_storages(model, intermediate) == 3 * 2
    assert kept_storages(model, square_mask) == 2
