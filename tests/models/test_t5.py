"""models/t5.py against transformers' T5ForConditionalGeneration on tiny random weights: logits and
loss, inputs_embeds, gradients, greedy generation, and strict loading of what save_pretrained writes."""

import json
from dataclasses import replace

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from models.checkpoint import Checkpoint, load_into
from models.t5 import T5Config, T5ForConditionalGeneration, load_t5
from tests.conftest import randomize

TINY = dict(
    model_type="t5", vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
    eos_token_id=1, pad_token_id=0,
)
LENGTHS = [23, 7, 3]  # encoder inputs; rows 2 and 3 padded; offsets up to 22 > max_distance reach the last bucket
KINDS = [("relu", True), ("relu", False), ("gated-gelu", True), ("gated-gelu", False)]  # T5 v1.0-like ... flan-like


def reference_model(feed_forward_proj: str, tied: bool, seed: int = 1) -> transformers.T5ForConditionalGeneration:
    """A random HF model, every weight random (HF's init sets the norms to 1, which would hide a
    misplaced norm). Untied: transformers 5 ties lm_head even then, so give it its own Parameter."""
    config = transformers.T5Config(**TINY, feed_forward_proj=feed_forward_proj, tie_word_embeddings=tied)
    reference = transformers.T5ForConditionalGeneration(config).eval()
    if not tied:
        reference.lm_head.weight = torch.nn.Parameter(torch.empty(TINY["vocab_size"], TINY["d_model"]))
    randomize(reference, seed)
    assert (reference.lm_head.weight is reference.shared.weight) == tied
    return reference


def saved(reference, directory, **save_kwargs) -> Checkpoint:
    reference.save_pretrained(directory, **save_kwargs)
    return Checkpoint.open(directory)


def pair(tmp_path, feed_forward_proj="gated-gelu", tied=False):
    """HF's model and ours loaded from its save_pretrained directory."""
    reference = reference_model(feed_forward_proj, tied)
    return load_t5(saved(reference, tmp_path / "saved")), reference


def encoder_batch(seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, TINY["vocab_size"], (len(LENGTHS), max(LENGTHS)), generator=generator)
    attention_mask = (torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # (B, S)
    return input_ids.masked_fill(attention_mask == 0, TINY["pad_token_id"]), attention_mask


def labels_batch(seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, TINY["vocab_size"], (len(LENGTHS), 6), generator=generator)
    labels[1, 4:] = -100  # answers of different lengths: the collator pads them with -100
    labels[2, 2:] = -100
    return labels


# ---- forward, loss, gradients ------------------------------------------------------------------


@pytest.mark.parametrize("feed_forward_proj, tied", KINDS)
def test_logits_and_loss_equal_transformers(tmp_path, feed_forward_proj, tied):
    ours, reference = pair(tmp_path, feed_forward_proj, tied)
    assert (ours.lm_head is None) == tied and ours.config.scale_decoder_outputs == tied
    input_ids, attention_mask = encoder_batch()
    labels = labels_batch()
    with torch.no_grad():
        out = ours(input_ids, attention_mask, labels=labels)
        ref = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        memory = ours.encode(input_ids, attention_mask)
    assert out.logits.shape == (3, 6, TINY["vocab_size"]) and out["logits"] is out.logits and out["loss"] is out.loss
    torch.testing.assert_close(memory, ref.encoder_last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)

    # explicit decoder_input_ids = HF's _shift_right of the labels; and the mask must matter
    decoder_input_ids = reference._shift_right(labels)
    assert torch.equal(ours.shift_right(labels), decoder_input_ids) and (decoder_input_ids == -100).sum() == 0
    with torch.no_grad():
        explicit = ours(input_ids, attention_mask, decoder_input_ids=decoder_input_ids)
        unmasked = ours(input_ids, None, decoder_input_ids=decoder_input_ids)
    assert explicit.loss is None
    torch.testing.assert_close(explicit.logits, out.logits, atol=0, rtol=0)
    assert not torch.allclose(unmasked.logits[1], out.logits[1], atol=1e-3), "padding must be masked"


def test_inputs_embeds_equals_input_ids(tmp_path):
    ours, reference = pair(tmp_path)
    input_ids, attention_mask = encoder_batch()
    labels = labels_batch()
    embeds = ours.shared.weight[input_ids]  # looked up by hand, as InstructBLIP builds its encoder input
    with torch.no_grad():
        by_ids = ours(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        by_embeds = ours(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
        ref = reference(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(by_embeds.logits, by_ids.logits, atol=0, rtol=0)
    torch.testing.assert_close(by_embeds.logits, ref.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        ours.encode(input_ids=input_ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one"):
        ours.encode(attention_mask=attention_mask)
    with pytest.raises(ValueError, match="pass labels"):
        ours(input_ids, attention_mask)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_wrt_inputs_embeds_equals_transformers(tmp_path, checkpointing):
    """The InstructBLIP path: a frozen T5 passes the LM loss's gradient back to the Q-Former's queries."""
    ours, reference = pair(tmp_path)
    ours.requires_grad_(False)
    if checkpointing:  # training mode for the recomputation; no dropout, so both runs are deterministic
        ours = T5ForConditionalGeneration(replace(ours.config, dropout_rate=0.0)).requires_grad_(False)
        ours.load_state_dict(load_t5(Checkpoint.open(tmp_path / "saved")).state_dict())
        ours.train()
        ours.encoder.gradient_checkpointing = ours.decoder.gradient_checkpointing = True
    input_ids, attention_mask = encoder_batch()
    labels = labels_batch()
    embeds = ours.shared.weight[input_ids].detach()
    ours_embeds, ref_embeds = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    loss = ours(inputs_embeds=ours_embeds, attention_mask=attention_mask, labels=labels).loss
    ref_loss = reference(inputs_embeds=ref_embeds, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(ours_embeds.grad).all() and ours_embeds.grad.abs().sum() > 0
    assert ours_embeds.grad[1, LENGTHS[1]:].abs().max() == 0, "padded inputs are masked: no gradient"
    torch.testing.assert_close(ours_embeds.grad, ref_embeds.grad, atol=1e-5, rtol=1e-4)


# ---- generation ---------------------------------------------------------------------------------


def hf_generate(reference, eos, max_new_tokens, **inputs):
    reference.generation_config.eos_token_id = eos
    return reference.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("feed_forward_proj, tied", [("relu", True), ("gated-gelu", False)])
@pytest.mark.parametrize("use_embeds", [False, True])
def test_greedy_generation_equals_transformers(tmp_path, feed_forward_proj, tied, use_embeds):
    ours, reference = pair(tmp_path, feed_forward_proj, tied)
    input_ids, attention_mask = encoder_batch()
    inputs = dict(inputs_embeds=ours.shared.weight[input_ids].detach()) if use_embeds else dict(input_ids=input_ids)
    n = 12
    # Without an eos in reach every row runs n steps; pick as eos a token row 0 emits at step 3 that
    # another row never emits, so one row stops mid-way (then pads) and one never stops.
    free = ours.generate(**inputs, attention_mask=attention_mask, max_new_tokens=n)
    eos = next(t for t in free[0, 3:].tolist() if any(t not in row for row in free[1:].tolist()))
    ours = T5ForConditionalGeneration(replace(ours.config, eos_token_id=eos)).eval()
    ours.load_state_dict(load_t5(Checkpoint.open(tmp_path / "saved")).state_dict())
    expected = hf_generate(reference, eos, n, **inputs, attention_mask=attention_mask)
    tokens = ours.generate(**inputs, attention_mask=attention_mask, max_new_tokens=n)
    assert tokens.dtype == torch.long and tokens.shape == expected.shape == (3, 1 + n)
    assert tokens.tolist() == expected.tolist()
    # the cases the comparison must have covered
    assert (tokens[:, 0] == TINY["decoder_start_token_id"]).all(), "the output starts with the start token"
    stopped = [row.index(eos) for row in tokens.tolist() if eos in row]
    assert any(stop < n for stop in stopped), "some row must emit eos before the last step"
    assert any(eos not in row for row in tokens.tolist()), "some row must never emit eos"
    row = next(r for r in tokens.tolist() if eos in r and r.index(eos) < n)
    assert set(row[row.index(eos) + 1:]) == {TINY["pad_token_id"]}, "after eos a row is padded"


def test_generation_stops_when_every_row_has_finished(tmp_path):
    """Several eos ids, one reached by each row: HF returns fewer than max_new_tokens columns, and so must we."""
    ours, reference = pair(tmp_path, "relu", True)
    input_ids, attention_mask = encoder_batch()
    free = ours.generate(input_ids, attention_mask, max_new_tokens=10)
    eos = tuple(sorted({row[2] for row in free.tolist()}))  # each row emits one of them by its step 2
    ours = T5ForConditionalGeneration(replace(ours.config, eos_token_id=eos)).eval()
    ours.load_state_dict(load_t5(Checkpoint.open(tmp_path / "saved")).state_dict())
    expected = hf_generate(reference, list(eos), 10, input_ids=input_ids, attention_mask=attention_mask)
    tokens = ours.generate(input_ids, attention_mask, max_new_tokens=10)
    assert tokens.shape[1] <= 3 < 11 and tokens.tolist() == expected.tolist()


def test_generation_projects_each_key_once(tmp_path):
    """The KV cache: each step projects keys for its one new position only, and the encoder output
    is projected for cross-attention once per generate call, not once per step."""
    ours, _ = pair(tmp_path)
    input_ids, attention_mask = encoder_batch()
    block = ours.decoder.block[1]  # not the first block: caching must not depend on owning the position table
    shapes = {"self": [], "cross": []}
    block.layer[0].SelfAttention.k.register_forward_hook(
        lambda m, args, out: shapes["self"].append(tuple(args[0].shape)))
    block.layer[1].EncDecAttention.k.register_forward_hook(
        lambda m, args, out: shapes["cross"].append(tuple(args[0].shape)))
    tokens = ours.generate(input_ids, attention_mask, max_new_tokens=5)
    D = TINY["d_model"]
    assert shapes["self"] == [(3, 1, D)] * (tokens.shape[1] - 1) and tokens.shape[1] == 6
    assert shapes["cross"] == [(3, max(LENGTHS), D)]


# ---- loading what save_pretrained writes ------------------------------------------------------------


@pytest.mark.parametrize("feed_forward_proj, tied", KINDS)
@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_strict_load_of_save_pretrained(tmp_path, feed_forward_proj, tied, max_shard_size):
    reference = reference_model(feed_forward_proj, tied)
    checkpoint = saved(reference, tmp_path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    assert (len(set(checkpoint.weight_map.values())) > 1) == (max_shard_size is not None), "sharded as asked"
    saved_keys = set()
    for shard in set(checkpoint.weight_map.values()):
        with safe_open(str(tmp_path / shard), framework="pt") as handle:
            saved_keys |= set(handle.keys())
    # the file holds each tied tensor once: shared.weight, plus lm_head.weight only when untied
    assert ("lm_head.weight" in saved_keys) != tied and not any("embed_tokens" in key for key in saved_keys)

    config = T5Config.from_hf(checkpoint.config)
    assert config.tie_word_embeddings, "transformers 5 writes tie_word_embeddings=true for every T5"
    assert config.scale_decoder_outputs == tied, "...and records the scaling separately"
    config = replace(config, tie_word_embeddings=tied)
    with torch.device("meta"):
        ours = T5ForConditionalGeneration(config)
    assert set(ours.state_dict()) == saved_keys
    load_into(ours, checkpoint.load_prefix(""), str(tmp_path)).eval()  # strict, assign=True
    assert set(checkpoint.opened_files) == set(checkpoint.weight_map.values())

    loaded = load_t5(Checkpoint.open(tmp_path))  # decides tying from the keys by itself
    input_ids, attention_mask = encoder_batch()
    labels = labels_batch()
    with torch.no_grad():
        ref = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        for model in (ours, loaded):
            torch.testing.assert_close(model(input_ids, attention_mask, labels=labels).logits, ref.logits,
                                       atol=1e-5, rtol=1e-5)


def test_load_instructblip_layout_with_legacy_keys(tmp_path):
    """InstructBLIP keeps T5 under `language_model.` with its config in `text_config`; older files also
    hold the stacks' copies of `shared` and an unused cross-attention position table."""
    reference = reference_model("gated-gelu", tied=False)
    state = {f"language_model.{k}": v.contiguous() for k, v in reference.state_dict().items()}  # all aliases
    state["language_model.decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    state = {k: v.clone() for k, v in state.items()}  # safetensors refuses shared memory
    save_file(state, str(tmp_path / "model.safetensors"))
    text_config = {**TINY, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "instructblip", "text_config": text_config}))
    checkpoint = Checkpoint.open(tmp_path)
    ours = load_t5(checkpoint, "language_model.", checkpoint.config["text_config"])
    input_ids, attention_mask = encoder_batch()
    labels = labels_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids, attention_mask, labels=labels).logits,
                                   reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits,
                                   atol=1e-5, rtol=1e-5)

    # a deduplicating saver may keep an alias in place of shared.weight
    save_file({k: v for k, v in state.items() if k != "language_model.shared.weight"},
              str(tmp_path / "model.safetensors"))
    ours = load_t5(tmp_path, "language_model.", text_config)
    torch.testing.assert_close(ours.shared.weight, reference.shared.weight, atol=0, rtol=0)

    state["language_model.encoder.embed_tokens.weight"] = state["language_model.encoder.embed_tokens.weight"] + 1
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="encoder.embed_tokens.weight differs from shared.weight"):
        load_t5(Checkpoint.open(tmp_path), "language_model.", text_config)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_load_like_transformers(tmp_path, dtype):
    """fp16 keeps `wo` in fp32 (transformers' _keep_in_fp32_modules), bf16 does not; logits as the reference's."""
    reference = reference_model("gated-gelu", tied=False)
    reference.save_pretrained(tmp_path)
    half_reference = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).eval()
    ours = load_t5(tmp_path, dtype=dtype)
    assert {name: p.dtype for name, p in ours.named_parameters()} == {
        name: p.dtype for name, p in half_reference.named_parameters() if "embed_tokens" not in name}
    wo_dtype = ours.decoder.block[0].layer[2].DenseReluDense.wo.weight.dtype
    assert wo_dtype == (torch.float32 if dtype == torch.float16 else dtype)
    input_ids, attention_mask = encoder_batch()
    labels = labels_batch()
    with torch.no_grad():
        out = ours(input_ids, attention_mask, labels=labels).logits
        ref = half_reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    assert out.dtype == ref.dtype == dtype
    # gelu_new: F.gelu(approximate="tanh") rounds once, the reference's Python formula after every op;
    # in bf16 (8 mantissa bits) a few logits differ by a couple of ulps
    tolerance = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(out, ref, atol=tolerance, rtol=tolerance)
    tokens = ours.generate(input_ids, attention_mask, max_new_tokens=4)
    assert tokens.shape == (3, 5) and tokens.dtype == torch.long
    if dtype == torch.float16:
        expected = hf_generate(half_reference, None, 4, input_ids=input_ids, attention_mask=attention_mask)
        assert tokens.tolist() == expected.tolist()


def test_fp16_overflow_is_clamped_like_transformers(tmp_path):
    """fp16 residuals that overflow become +-(fp16 max - 1000) after the sublayer, not inf then NaN."""
    reference = reference_model("gated-gelu", tied=False)
    with torch.no_grad():  # embeddings near fp16's max (65504): adding the first attention output overflows
        reference.shared.weight.copy_(60000 * reference.shared.weight.sign())
        for stack in (reference.encoder, reference.decoder):
            stack.block[0].layer[0].SelfAttention.o.weight.mul_(1e4)
    reference.save_pretrained(tmp_path)
    half_reference = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16).eval()
    ours = load_t5(Checkpoint.open(tmp_path), dtype="fp16")
    input_ids, attention_mask = encoder_batch()
    with torch.no_grad():
        first_sublayer = ours.encoder.block[0].layer[0](ours.shared(input_ids), None)
        out = ours(input_ids, attention_mask, labels=labels_batch()).logits
        ref = half_reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels_batch()).logits
    assert torch.isinf(first_sublayer).any(), "the weights must overflow, or this test shows nothing"
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)


# ---- config --------------------------------------------------------------------------------------


def test_config_from_hf():
    # google/flan-t5-xl's config.json (transformers 4), abridged to the fields we read
    flan = T5Config.from_hf({
        "model_type": "t5", "d_ff": 5120, "d_kv": 64, "d_model": 2048, "decoder_start_token_id": 0,
        "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-06,
        "num_decoder_layers": 24, "num_heads": 32, "num_layers": 24, "pad_token_id": 0,
        "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False, "vocab_size": 32128,
    })
    assert ((flan.d_model, flan.d_ff, flan.num_layers, flan.num_decoder_layers, flan.num_heads)
            == (2048, 5120, 24, 24, 32))
    assert flan.is_gated_act and flan.dense_act_fn == "gelu_new"
    assert not flan.tie_word_embeddings and not flan.scale_decoder_outputs
    # T5 v1.0: ReLU, tied and scaled by default; num_decoder_layers defaults to num_layers
    t5 = T5Config.from_hf({"model_type": "t5", "num_layers": 3})
    assert ((t5.dense_act_fn, t5.is_gated_act, t5.tie_word_embeddings, t5.scale_decoder_outputs)
            == ("relu", False, True, True))
    assert t5.num_decoder_layers == 3
    # every field as transformers parses it, for both layouts, via its own saved config
    for proj, tied in KINDS:
        hf = transformers.T5Config(**TINY, feed_forward_proj=proj, tie_word_embeddings=tied)
        ours = T5Config.from_hf(hf.to_dict())
        assert (ours.dense_act_fn, ours.is_gated_act, ours.scale_decoder_outputs) == (
            hf.dense_act_fn, hf.is_gated_act, hf.scale_decoder_outputs)
    # a saved dense_act_fn / is_gated_act wins over feed_forward_proj, in transformers as here
    conflicting = {"model_type": "t5", "feed_forward_proj": "gated-gelu", "dense_act_fn": "relu", "is_gated_act": False}
    hf = transformers.T5Config.from_dict(conflicting)
    ours = T5Config.from_hf(conflicting)
    assert (ours.dense_act_fn, ours.is_gated_act) == (hf.dense_act_fn, hf.is_gated_act) == ("relu", False)
    assert T5Config.from_hf({"model_type": "t5", "eos_token_id": [1, 2]}).eos_token_id == (1, 2)


def test_config_errors():
    with pytest.raises(ValueError, match="model_type 'bart' is not T5"):
        T5Config.from_hf({"model_type": "bart"})
    with pytest.raises(ValueError, match="model_type None"):
        T5Config.from_hf({})
    with pytest.raises(ValueError, match="activation 'swish'.*is not supported"):
        T5Config.from_hf({"model_type": "t5", "feed_forward_proj": "gated-swish"})
