"""models/llama.py against transformers' LlamaForCausalLM and Qwen2ForCausalLM on tiny random weights
loaded from sharded save_pretrained directories: logits, loss, GQA, padding on either side, the KV
cache (allocated once per generation), greedy generation at batch 1 and on a left-padded batch with one or several
eos ids, RoPE scaling, bf16, and the config's refusals."""

import pytest
import torch
import transformers

from models.checkpoint import Checkpoint
from models.llama import KVCache, LlamaConfig, LlamaForCausalLM, load_llama
from tests.conftest import randomize

VOCAB, HEADS = 96, 4
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=HEADS,
            max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LENGTHS = [9, 6, 3]  # real tokens per row


def reference_model(model_type="llama", kv_heads=2, tied=False, seed=1, **extra):
    """A random HF model, every weight random (unit norms and zero biases would hide a misplaced one)."""
    if model_type == "llama":
        config = transformers.LlamaConfig(**TINY, num_key_value_heads=kv_heads, tie_word_embeddings=tied, **extra)
        reference = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**TINY, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **extra)
        reference = transformers.Qwen2ForCausalLM(config)
    randomize(reference, seed)
    assert (reference.lm_head.weight is reference.model.embed_tokens.weight) == tied
    return reference.eval()


def pair(tmp_path, model_type="llama", kv_heads=2, tied=False, **extra):
    """HF's model and ours, loaded from its sharded save_pretrained directory."""
    reference = reference_model(model_type, kv_heads, tied, **extra)
    reference.save_pretrained(tmp_path / "saved", max_shard_size="30KB")
    checkpoint = Checkpoint.open(tmp_path / "saved")
    assert len(set(checkpoint.weight_map.values())) > 1, "the checkpoint must be sharded"
    return load_llama(checkpoint), reference


def right_padded(seed=2):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=generator)
    mask = (torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # (B, T)
    return input_ids.masked_fill(mask == 0, 0), mask


def left_padded(seed=2):
    """The same rows as right_padded, their padding moved to the front."""
    input_ids, mask = right_padded(seed)
    shifts = [max(LENGTHS) - n for n in LENGTHS]
    return (torch.stack([row.roll(s) for row, s in zip(input_ids, shifts)]),
            torch.stack([row.roll(s) for row, s in zip(mask, shifts)]))


CASES = [("llama", 4, False), ("llama", 2, False), ("llama", 1, True), ("qwen2", 2, False), ("qwen2", 1, True)]


@pytest.mark.parametrize("model_type, kv_heads, tied", CASES)
def test_logits_and_loss_equal_transformers(tmp_path, model_type, kv_heads, tied):
    ours, reference = pair(tmp_path, model_type, kv_heads, tied)
    assert ours.config.num_key_value_heads == kv_heads and (ours.lm_head is None) == tied
    assert (ours.model.layers[0].self_attn.q_proj.bias is not None) == (model_type == "qwen2")
    assert ours.model.layers[0].self_attn.o_proj.bias is None
    input_ids, mask = right_padded()
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt that is not scored
    out = ours(input_ids=input_ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask, labels=labels)
    real = mask.bool()  # padding rows are never read; the reference fills them differently
    torch.testing.assert_close(out.logits[real], expected.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
    assert out["logits"].shape == (3, max(LENGTHS), VOCAB) and out.last_hidden_state.shape == (3, max(LENGTHS), 32)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_left_padding_gives_each_row_its_unpadded_logits(tmp_path, model_type):
    ours, reference = pair(tmp_path, model_type)
    input_ids, mask = left_padded()
    logits = ours(input_ids=input_ids, attention_mask=mask).logits
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate passes for a padded prompt
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    for row, n in enumerate(LENGTHS):  # and each row as if it were alone
        alone = ours(input_ids=input_ids[row:row + 1, -n:]).logits[0]
        torch.testing.assert_close(logits[row, -n:], alone, atol=1e-5, rtol=1e-5)


def test_padding_inside_a_row_shifts_no_position(tmp_path):
    """RoPE is blind to a shift of every position, so left padding alone cannot tell whether positions
    come from the mask; a gap can (InstructBLIP's [queries; padding; prompt] has one)."""
    ours, _ = pair(tmp_path)
    input_ids, _ = right_padded()
    row = input_ids[:1, :6]
    gapped = torch.cat([row[:, :2], torch.zeros(1, 3, dtype=torch.long), row[:, 2:]], dim=1)  # (1, 9)
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 1, 1]])
    logits = ours(input_ids=gapped, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(logits, ours(input_ids=row).logits[0], atol=1e-5, rtol=1e-5)


def test_inputs_embeds_equals_input_ids_and_gradients_reach_them(tmp_path):
    ours, reference = pair(tmp_path)
    input_ids, mask = right_padded()
    embeds = ours.model.embed_tokens(input_ids).detach().requires_grad_()
    out = ours(inputs_embeds=embeds, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, -100))
    torch.testing.assert_close(out.logits, ours(input_ids=input_ids, attention_mask=mask).logits, atol=0, rtol=0)
    out.loss.backward()
    ref_embeds = embeds.detach().clone().requires_grad_()
    reference(inputs_embeds=ref_embeds, attention_mask=mask,
              labels=input_ids.masked_fill(mask == 0, -100)).loss.backward()
    torch.testing.assert_close(embeds.grad, ref_embeds.grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        ours(input_ids=input_ids, inputs_embeds=embeds)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    ours, _ = pair(tmp_path)
    input_ids, mask = right_padded()
    grads = []
    for flag in (False, True):
        ours.zero_grad()
        ours.train()
        ours.model.gradient_checkpointing = flag
        ours(input_ids=input_ids, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append(ours.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().sum() > 0


def test_kv_cache_continues_a_sequence_exactly(tmp_path):
    """Prompt in one forward, the rest in chunks through the cache: the same logits as one forward."""
    ours, _ = pair(tmp_path)
    input_ids, mask = left_padded()
    full = ours(input_ids=input_ids, attention_mask=mask).logits
    cache = KVCache(ours.config, batch=3, max_len=max(LENGTHS), dtype=torch.float32, device="cpu")
    first = ours(input_ids=input_ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits
    second = ours(input_ids=input_ids[:, 5:7], attention_mask=mask[:, :7], cache=cache).logits
    third = ours(input_ids=input_ids[:, 7:], attention_mask=mask, cache=cache).logits
    chunks = torch.cat([first, second, third], dim=1)
    torch.testing.assert_close(chunks[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-5)
    assert cache.length == max(LENGTHS)
    with pytest.raises(ValueError, match="must cover the cached and the new positions"):
        ours(input_ids=input_ids[:, :1], attention_mask=mask[:, :1], cache=cache)


def hf_generate(reference, eos, n, **inputs):
    reference.generation_config.eos_token_id = eos
    return reference.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=0)


@pytest.mark.parametrize("model_type, kv_heads, tied", [("llama", 2, False), ("qwen2", 1, True)])
@pytest.mark.parametrize("use_embeds", [False, True])
def test_greedy_generation_equals_transformers_with_and_without_the_cache(tmp_path, model_type, kv_heads, tied,
                                                                         use_embeds):
    ours, reference = pair(tmp_path, model_type, kv_heads, tied)
    input_ids, mask = left_padded()
    inputs = (dict(inputs_embeds=ours.model.embed_tokens(input_ids).detach()) if use_embeds
              else dict(input_ids=input_ids))
    n = 10
    # Pick as eos a token row 0 emits at step 3 that another row never emits: one row stops and pads, one never stops.
    free = ours.generate(**inputs, attention_mask=mask, max_new_tokens=n, eos_token_id=())
    eos = next(t for t in free[0, 3:].tolist() if any(t not in row for row in free[1:].tolist()))
    expected = hf_generate(reference, eos, n, **inputs, attention_mask=mask)
    # HF returns the prompt before the new tokens
    expected = expected if use_embeds else expected[:, input_ids.shape[1]:]
    for use_cache in (True, False):
        tokens = ours.generate(**inputs, attention_mask=mask, max_new_tokens=n, eos_token_id=eos, use_cache=use_cache)
        assert tokens.dtype == torch.long and tokens.tolist() == expected.tolist(), f"use_cache={use_cache}"
    stopped = [row.index(eos) for row in tokens.tolist() if eos in row]
    assert any(stop < n - 1 for stop in stopped), "some row must emit eos before the last step"
    assert any(eos not in row for row in tokens.tolist()), "some row must never emit eos"
    row = next(r for r in tokens.tolist() if eos in r and r.index(eos) < n - 1)
    assert set(row[row.index(eos) + 1:]) == {TINY["pad_token_id"]}, "after eos a row is padded"


@pytest.mark.parametrize("model_type, kv_heads, tied", [("llama", 2, False), ("qwen2", 1, True)])
def test_greedy_generation_at_batch_one_stops_at_any_listed_eos(tmp_path, model_type, kv_heads, tied):
    """One unpadded prompt, no mask, and two eos ids (as generation_config.json lists for Llama 3 or Qwen2):
    the second listed id, first emitted at step 3, ends the generation there."""
    ours, reference = pair(tmp_path, model_type, kv_heads, tied)
    input_ids = right_padded()[0][:1]  # the 9-token row, all real
    n = 10
    free = ours.generate(input_ids=input_ids, max_new_tokens=n, eos_token_id=())[0].tolist()
    step = next(i for i in range(3, n - 1) if free[i] not in free[:i])  # a token not emitted before it
    late = next((t for t in free[step + 1:] if t not in free[:step + 1]), VOCAB - 1)  # listed first, never reached
    eos = (late, free[step])
    expected = hf_generate(reference, list(eos), n, input_ids=input_ids)[:, input_ids.shape[1]:]
    for use_cache in (True, False):
        tokens = ours.generate(input_ids=input_ids, max_new_tokens=n, eos_token_id=eos, use_cache=use_cache)
        assert tokens.tolist() == expected.tolist() == [free[:step + 1]], f"use_cache={use_cache}"


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_generation_stops_when_every_row_has_finished(tmp_path, model_type):
    ours, reference = pair(tmp_path, model_type)
    input_ids, mask = left_padded()
    free = ours.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=8, eos_token_id=())
    eos = tuple(sorted({row[1] for row in free.tolist()}))  # each row emits one of them by its step 1
    expected = hf_generate(reference, list(eos), 8, input_ids=input_ids, attention_mask=mask)[:, input_ids.shape[1]:]
    tokens = ours.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos)
    assert tokens.shape[1] <= 2 < 8 and tokens.tolist() == expected.tolist()


def test_generation_allocates_its_kv_cache_once(tmp_path, monkeypatch):
    """One static cache of T + max_new_tokens positions, made before the first step; every step writes into the same
    buffers in place and attends over views of them (a cache grown by concatenation would move to new storage)."""
    import models.llama

    ours, _ = pair(tmp_path)
    input_ids, mask = left_padded()
    caches, seen = [], []
    real_init, real_update = KVCache.__init__, KVCache.update

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        caches.append(self)

    def update(self, layer, k, v):
        keys, values = real_update(self, layer, k, v)
        seen.append((layer, self.keys[layer].data_ptr(), self.values[layer].data_ptr(), keys.data_ptr(),
                     values.data_ptr(), keys.shape[2]))
        return keys, values

    monkeypatch.setattr(models.llama.KVCache, "__init__", init)
    monkeypatch.setattr(models.llama.KVCache, "update", update)
    n = 6
    tokens = ours.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, eos_token_id=())
    assert tokens.shape == (3, n) and len(caches) == 1
    layers = ours.config.num_hidden_layers
    assert [tuple(k.shape) for k in caches[0].keys] == [(3, ours.config.num_key_value_heads, max(LENGTHS) + n,
                                                         ours.config.head_dim)] * layers
    assert len(seen) == layers * n  # the prompt, then one token a step (the last token is never fed back)
    for layer in range(layers):
        steps = [s for s in seen if s[0] == layer]
        assert len({(k, v) for _, k, v, *_ in steps}) == 1, "one buffer per layer for the whole generation"
        assert all(k_view == k and v_view == v for _, k, v, k_view, v_view, _ in steps), "attention reads views of it"
        assert [length for *_, length in steps] == list(range(max(LENGTHS), max(LENGTHS) + n))


ROPE_SCALINGS = [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 100.0},  # small: every branch of llama3 is taken
]


@pytest.mark.parametrize("rope", ROPE_SCALINGS, ids=lambda r: r["rope_type"])
def test_rope_scaling_equals_transformers(tmp_path, rope):
    ours, reference = pair(tmp_path, rope_parameters=dict(rope))
    assert ours.config.rope.type == rope["rope_type"] and ours.config.rope.theta == 100.0
    input_ids, mask = right_padded()
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask).logits
        unscaled = reference_model()(input_ids=input_ids, attention_mask=mask).logits
    logits = ours(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, unscaled, atol=1e-3), "the scaling must change the logits"


def test_bf16_load_keeps_close_to_fp32(tmp_path):
    ours, _ = pair(tmp_path)
    half = load_llama(tmp_path / "saved", dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    input_ids, mask = right_padded()
    logits = half(input_ids=input_ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16
    reference = ours(input_ids=input_ids, attention_mask=mask).logits
    assert (logits.float() - reference)[mask.bool()].abs().max() < 0.1 * reference.abs().max()


def test_config_from_hf_reads_both_rope_spellings():
    old = dict(model_type="llama", hidden_size=64, num_attention_heads=4, rope_theta=5e5,
               rope_scaling={"type": "linear", "factor": 2.0}, eos_token_id=[2, 7], pad_token_id=-1)
    new = dict(model_type="llama", hidden_size=64, num_attention_heads=4,
               rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}, eos_token_id=[2, 7])
    assert LlamaConfig.from_hf(old) == LlamaConfig.from_hf(new)
    cfg = LlamaConfig.from_hf(old)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.eos_token_id, cfg.pad_token_id) == (16, 4, (2, 7), None)
    qwen = LlamaConfig.from_hf(dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, use_sliding_window=False,
                                    sliding_window=4096, attention_bias=False))
    assert (qwen.qkv_bias, qwen.o_bias) == (True, False)


@pytest.mark.parametrize("cfg, message", [
    (dict(model_type="mistral"), "reads llama and qwen2 configs"),
    (dict(model_type="llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "rope type 'dynamic' is not ported"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=16), "sliding-window attention"),
    (dict(model_type="llama", hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(model_type="llama", partial_rotary_factor=0.5), "partial_rotary_factor"),
])
def test_config_refusals(cfg, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf(cfg)


def test_tied_checkpoint_with_a_differing_lm_head_is_refused(tmp_path):
    from safetensors.torch import save_file

    reference = reference_model(tied=True)
    reference.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    save_file({**state, "lm_head.weight": torch.zeros(VOCAB, 32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_llama(tmp_path)
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()},
              str(tmp_path / "model.safetensors"))
    assert isinstance(load_llama(tmp_path), LlamaForCausalLM)


def test_rope_tables_are_computed_once_per_dtype_and_survive_a_dtype_cast():
    from models.llama import rope_inverse_frequencies

    cfg = LlamaConfig.from_hf(dict(TINY, model_type="llama", num_key_value_heads=2))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        model(input_ids=ids)
        tables = dict(model.model.rope.tables)
        model(input_ids=ids[:, :5])  # a shorter batch reads rows of the same tables
        assert model.model.rope.tables.keys() == tables.keys() and len(tables) == 1
        assert all(a is b for key in tables for a, b in zip(tables[key], model.model.rope.tables[key]))
        model.generate(input_ids=ids, max_new_tokens=4)  # 11 positions: the same length-16 table
        assert model.model.rope.length == 16 and len(model.model.rope.tables) == 1
        cos, _ = next(iter(model.model.rope.tables.values()))
        angles = torch.arange(16).float()[:, None] * rope_inverse_frequencies(cfg)
        # the table is the reference's fp32 cos of the same fp32 angles (an elementwise cos: at most an ulp)
        torch.testing.assert_close(cos, torch.cat([angles, angles], -1).cos(), atol=2 * torch.finfo(torch.float32).eps,
                                   rtol=0)
        model.to(torch.bfloat16)  # casts parameters and buffers, never the fp32 angles
        model(input_ids=ids)
        bf16_cos, _ = model.model.rope.tables[(ids.device, torch.bfloat16)]
        assert torch.equal(bf16_cos, cos.to(torch.bfloat16))


@pytest.mark.parametrize("model_type, kv_heads", [("llama", 4), ("qwen2", 2)])
def test_packed_rows_give_each_example_the_logits_transformers_gives_it_alone(tmp_path, model_type, kv_heads):
    """Three examples packed into two rows (data/packing.py): block-diagonal causal attention and positions
    restarting per example give each one exactly its own logits; a segment-blind model would not."""
    from data.packing import pack_examples
    from models.attention import segment_positions

    ours, reference = pair(tmp_path, model_type, kv_heads)
    generator = torch.Generator().manual_seed(5)
    examples = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in LENGTHS]
    packed = pack_examples(examples, [[-100] * len(e) for e in examples], budget=12, pad_id=0)
    assert packed.spans == [[(0, 9), (9, 12)], [(0, 6)]] and packed.order == [0, 2, 1]
    assert torch.equal(segment_positions(packed.segment_ids), packed.position_ids)
    inputs = dict(input_ids=packed.input_ids, attention_mask=packed.attention_mask)
    logits = ours(**inputs, position_ids=packed.position_ids, segment_ids=packed.segment_ids).logits
    derived = ours(**inputs, segment_ids=packed.segment_ids).logits  # positions derived from the segments
    torch.testing.assert_close(derived, logits, atol=0, rtol=0)
    spans = [(row, start, end) for row, row_spans in enumerate(packed.spans) for start, end in row_spans]
    for i, (row, start, end) in zip(packed.order, spans):
        with torch.no_grad():
            alone = reference(input_ids=torch.tensor([examples[i]])).logits[0]
        torch.testing.assert_close(logits[row, start:end], alone, atol=1e-5, rtol=1e-5)
    blind = ours(**inputs, position_ids=packed.position_ids).logits  # causal over the whole row
    assert not torch.allclose(blind[0, 9:12], logits[0, 9:12], atol=1e-3), "the third example saw the first"
    with pytest.raises(ValueError, match="segment_ids have shape"):
        ours(**inputs, segment_ids=packed.segment_ids[:, :5])
