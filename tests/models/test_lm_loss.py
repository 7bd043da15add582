"""models/lm_loss.py: the label-only, chunked next-token loss against the plain full-logits cross entropy
(loss and gradients within 1e-6 in fp32), its bf16 upcast, and what it keeps for backward; then a tiny
LLaMA / Qwen2 training forward with LoRA on q/k/v/o against the loss of its full logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from lora import LoRAConfig, inject_lora, mark_only_lora_trainable
from models.llama import LlamaConfig, LlamaForCausalLM
from models.lm_loss import next_token_loss
from tests.lora_fixtures import give_lora_B_values

VOCAB, WIDTH = 97, 16  # a vocabulary no other dimension shares, so a (.., V) tensor is recognisable
TOL = dict(atol=1e-6, rtol=1e-6)


def full_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What models/llama.py computed before models/lm_loss.py (and transformers' ForCausalLMLoss)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def awkward_labels(seed=0) -> torch.Tensor:
    """(3, 8): row 0 scored in the middle and at its very last position, row 1 not at all, row 2 from
    position 0 (never scored: nothing predicts it) to the end."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (3, 8), generator=generator)
    labels[0, :3] = -100
    labels[0, 5] = -100
    labels[1] = -100
    return labels


def inputs(dtype=torch.float32, seed=1):
    """An upstream trainable weight, so the gradient must flow through the gathered rows to it."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 8, WIDTH, generator=generator, dtype=dtype).requires_grad_()
    upstream = (torch.randn(WIDTH, WIDTH, generator=generator) / WIDTH ** 0.5).to(dtype).requires_grad_()
    head = torch.randn(VOCAB, WIDTH, generator=generator, dtype=dtype).requires_grad_()
    return x, upstream, head


class CountingHead:
    """The LM head as a callable that records the rows of every call."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.calls = weight, []

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.calls.append(rows.shape[:-1].numel())
        return F.linear(rows, self.weight)


def scored_count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1024])  # 5 leaves a remainder; 1024 > the 11 scored tokens
def test_chunked_loss_and_gradients_equal_the_full_loss(chunk_size):
    labels = awkward_labels()
    n = scored_count(labels)
    assert n == 11 and labels[0, -1] != -100 and labels[2, 0] != -100
    x, upstream, weight = inputs()
    head = CountingHead(weight)
    loss = next_token_loss(torch.tanh(x @ upstream), labels, head, chunk_size)
    assert head.calls == [min(chunk_size, n - start) for start in range(0, n, chunk_size)], (
        "one call per chunk, scored rows only")
    grads = torch.autograd.grad(loss, (x, upstream, weight))
    assert len(head.calls) == 2 * math.ceil(n / chunk_size), "every chunk's logits are recomputed in backward"

    x_ref, upstream_ref, weight_ref = (t.detach().clone().requires_grad_() for t in (x, upstream, weight))
    expected = full_logits_loss(F.linear(torch.tanh(x_ref @ upstream_ref), weight_ref), labels)
    expected_grads = torch.autograd.grad(expected, (x_ref, upstream_ref, weight_ref))
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, expected, **TOL)
    for name, grad, reference in zip(("hidden's input", "upstream weight", "head weight"), grads, expected_grads):
        torch.testing.assert_close(grad, reference, **TOL, msg=name)
    assert grads[0][1].abs().sum() == 0 and grads[0][2, -1].abs().sum() == 0, "unscored positions get no gradient"
    assert grads[0][0].abs().sum() > 0


def test_a_bare_weight_is_the_same_head():
    labels = awkward_labels()
    x, upstream, weight = inputs()
    hidden = torch.tanh(x @ upstream)
    torch.testing.assert_close(next_token_loss(hidden, labels, weight, 3),
                               next_token_loss(hidden, labels, CountingHead(weight), 4), **TOL)


def test_no_scored_token_is_nan_as_the_reference():
    x, upstream, weight = inputs()
    labels = torch.full((3, 8), -100)
    labels[:, 0] = 5  # position 0 is never scored
    loss = next_token_loss(torch.tanh(x @ upstream), labels, weight)
    expected = full_logits_loss(F.linear(torch.tanh(x @ upstream), weight), labels)
    assert torch.isnan(loss) and torch.isnan(expected)
    (grad,) = torch.autograd.grad(loss, x)  # still attached to the graph, and moves nothing
    assert grad.abs().sum() == 0


def test_a_bf16_head_is_upcast_per_chunk():
    """A bf16 head gives bf16 logits; each chunk is upcast before the softmax, as the reference upcasts all of them."""
    labels = awkward_labels()
    x, upstream, weight = inputs(torch.bfloat16)
    head = CountingHead(weight)
    loss = next_token_loss(x @ upstream, labels, head, chunk_size=4)
    expected = full_logits_loss(F.linear(x @ upstream, weight), labels)
    # bf16 softmax
    unscaled = F.cross_entropy(F.linear(x @ upstream, weight)[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, **TOL)
    assert (unscaled.dtype == torch.bfloat16
            and (unscaled.float() - expected).abs() > 1e-5), "the upcast must matter here"
    (grad,) = torch.autograd.grad(loss, weight)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(grad, expected_grad, atol=1e-2, rtol=1e-2)  # bf16 rounding of the same sums


def saved_shapes(fn, weights=()) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd keeps for backward while fn() runs, as its loss, except views of
    `weights` (a matmul keeps the head's weight as a (D, V) transpose: no memory of its own)."""
    shapes = []
    free = {w.untyped_storage().data_ptr() for w in weights}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in free:
            shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn().backward()
    return shapes


def test_nothing_vocabulary_sized_is_kept_for_backward():
    labels = awkward_labels()
    x, upstream, weight = inputs()
    chunked = saved_shapes(lambda: next_token_loss(torch.tanh(x @ upstream), labels, weight, chunk_size=4), [weight])
    plain = saved_shapes(lambda: full_logits_loss(F.linear(torch.tanh(x @ upstream), weight), labels), [weight])
    assert any(shape[-1] == VOCAB for shape in plain), "the detector must see the full loss's logits"
    assert not any(VOCAB in shape for shape in chunked), chunked


def test_misaligned_labels_and_a_bad_chunk_size_are_refused():
    x, upstream, weight = inputs()
    with pytest.raises(ValueError, match="must align with the inputs: \\(3, 8\\)"):
        next_token_loss(x, awkward_labels()[:, :7], weight)
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        next_token_loss(x, awkward_labels(), weight, chunk_size=0)


# ---- the training forward of a decoder-only model ---------------------------------------------------

LM_VOCAB = 101


def tiny_lm(tied: bool, seed=0) -> LlamaForCausalLM:
    """A random Qwen2-like model (biases on q/k/v, grouped-query) with LoRA on q/k/v/o, its B random too."""
    cfg = LlamaConfig(vocab_size=LM_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1)
                    + (1.0 if "norm" in name else 0.0))
    inject_lora(model, LoRAConfig([r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"], r=2, alpha=4))
    mark_only_lora_trainable(model)
    give_lora_B_values(model, 0.2)  # B starts at zero: A would get no gradient to compare
    return model.train()


def prompt_answer_batch(seed=2):
    """Right-padded rows [prompt, answer]; labels on the answers only (one row's answer runs to the last column)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, LM_VOCAB, (3, 12), generator=generator)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 6:] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return input_ids, mask, labels


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_training_forward_equals_the_full_logits_loss_and_gradients(tied):
    model = tiny_lm(tied)
    model.loss_chunk_size = 3  # several chunks through the model's own path
    input_ids, mask, labels = prompt_answer_batch()
    calls = []
    head = model.logits
    # instance attribute: forward's self.logits
    model.logits = lambda hidden: (calls.append(hidden.shape[:-1].numel()), head(hidden))[1]

    out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    new = lora_grads(model)
    n = scored_count(labels)
    assert max(calls) == 3 and sum(calls) == 2 * n, (
        "only scored rows meet the vocabulary, each chunk twice (forward, backward)")

    old = model(input_ids=input_ids, attention_mask=mask)
    expected = full_logits_loss(old.logits, labels)  # the logits are computed here, when read
    expected.backward()
    assert calls[-1] == input_ids.numel()
    torch.testing.assert_close(out.loss, expected, **TOL)
    assert len(new) == 2 * 4 * 2  # A and B of q/k/v/o in both layers
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(new[name], grad, **TOL, msg=name)
        assert grad.abs().sum() > 0, name


def test_the_training_forward_keeps_nothing_vocabulary_sized_for_backward():
    model = tiny_lm(tied=False)
    input_ids, mask, labels = prompt_answer_batch()
    weights = list(model.parameters())
    ours = saved_shapes(lambda: model(input_ids=input_ids, attention_mask=mask, labels=labels).loss, weights)
    plain = saved_shapes(lambda: full_logits_loss(model(input_ids=input_ids, attention_mask=mask).logits, labels),
                         weights)
    assert any(shape[-1] == LM_VOCAB for shape in plain), "the detector must see the full loss's logits"
    assert not any(LM_VOCAB in shape for shape in ours), [s for s in ours if LM_VOCAB in s]


def test_gradient_checkpointing_of_every_layer_keeps_the_loss_and_gradients():
    model = tiny_lm(tied=False)
    input_ids, mask, labels = prompt_answer_batch()
    runs = []
    for flag in (False, True):
        model.model.gradient_checkpointing = flag
        loss = []
        shapes = saved_shapes(lambda: loss.append(model(input_ids=input_ids, attention_mask=mask,
                                                        labels=labels).loss) or loss[0])
        runs.append((loss[0].detach(), lora_grads(model), len(shapes)))
    (loss, grads, kept), (loss_ckpt, grads_ckpt, kept_ckpt) = runs
    torch.testing.assert_close(loss_ckpt, loss, **TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, **TOL, msg=name)
    # a checkpointed layer keeps only its inputs (x, cos, sin, mask) for backward: 4 per layer, 2 layers
    assert kept_ckpt < kept / 4, f"checkpointing must drop the layers' saved activations ({kept_ckpt} vs {kept})"
