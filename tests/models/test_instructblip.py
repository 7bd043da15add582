"""The composed InstructBLIP against transformers' InstructBlipForConditionalGeneration, loaded from
a sharded save: vision and Q-Former outputs, logits and loss, greedy generation, LoRA selection."""

import copy

import pytest
import torch

from lora import LoRAConfig, inject_lora
from models import load_instructblip
from tests.lora_fixtures import peft_lora_modules
from tests.conftest import randomize

Q, IMAGE_TOKEN, VOCAB = 4, 119, 120


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, T5Config

    config = InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, cross_attention_frequency=1),
        text_config=T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                             num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                             feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                             pad_token_id=0, eos_token_id=1).to_dict(),
        num_query_tokens=Q, image_token_index=IMAGE_TOKEN,
    )
    torch.manual_seed(0)
    reference = InstructBlipForConditionalGeneration(config).eval()
    randomize(reference, 1, scale=0.2)  # every parameter random: default inits (zero biases, unit norms) hide bugs
    directory = tmp_path_factory.mktemp("instructblip")
    reference.save_pretrained(directory, max_shard_size="40KB")
    return directory, reference


def inputs(seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, 32, 32, generator=g)
    qformer_ids = torch.randint(5, 100, (batch, 6), generator=g)
    qformer_mask = torch.ones(batch, 6, dtype=torch.long)
    qformer_mask[1, 4:] = 0
    prompt = torch.randint(2, IMAGE_TOKEN, (batch, 5), generator=g)
    prompt_mask = torch.ones(batch, 5, dtype=torch.long)
    prompt_mask[2, 3:] = 0
    labels = torch.randint(2, IMAGE_TOKEN, (batch, 4), generator=g)
    labels[0, 3] = -100
    return pixel_values, qformer_ids, qformer_mask, prompt, prompt_mask, labels


def with_placeholders(prompt, prompt_mask):
    """transformers 5's spelling of the same sequence: Q image tokens in front of the prompt."""
    batch = prompt.shape[0]
    ids = torch.cat([torch.full((batch, Q), IMAGE_TOKEN), prompt], dim=1)
    return ids, torch.cat([torch.ones(batch, Q, dtype=torch.long), prompt_mask], dim=1)


def test_sharded_checkpoint_gives_the_reference_logits_and_loss(saved):
    directory, reference = saved
    ours = load_instructblip(directory)
    pixel_values, qformer_ids, qformer_mask, prompt, prompt_mask, labels = inputs()
    out = ours(pixel_values=pixel_values, qformer_input_ids=qformer_ids, qformer_attention_mask=qformer_mask,
               input_ids=prompt, attention_mask=prompt_mask, labels=labels)
    ids, mask = with_placeholders(prompt, prompt_mask)
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values, qformer_input_ids=qformer_ids,
                             qformer_attention_mask=qformer_mask, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["loss"], expected.loss, atol=1e-4, rtol=1e-4)
    assert out.logits.shape == (3, 4, VOCAB)


def test_vision_and_qformer_outputs_equal_the_reference(saved):
    directory, reference = saved
    ours = load_instructblip(directory)
    pixel_values, qformer_ids, qformer_mask, *_ = inputs(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours.vision_model(pixel_values),
                                   reference.vision_model(pixel_values).last_hidden_state, atol=1e-4, rtol=1e-4)
        features = reference.get_image_features(pixel_values=pixel_values, qformer_input_ids=qformer_ids,
                                                qformer_attention_mask=qformer_mask)
        projected = features.pooler_output if hasattr(features, "pooler_output") else features[0]
        torch.testing.assert_close(ours.query_embeddings(pixel_values, qformer_ids, qformer_mask), projected,
                                   atol=1e-4, rtol=1e-4)


def test_greedy_generation_is_token_identical(saved):
    directory, reference = saved
    ours = load_instructblip(directory)
    pixel_values, qformer_ids, qformer_mask, prompt, prompt_mask, _ = inputs(seed=3, batch=4)
    ids, mask = with_placeholders(prompt, prompt_mask)
    with torch.no_grad():
        expected = reference.generate(pixel_values=pixel_values, qformer_input_ids=qformer_ids,
                                      qformer_attention_mask=qformer_mask, input_ids=ids, attention_mask=mask,
                                      max_new_tokens=8, do_sample=False, num_beams=1)
    got = ours.generate(pixel_values=pixel_values, qformer_input_ids=qformer_ids, qformer_attention_mask=qformer_mask,
                        input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=8)
    assert got.tolist() == expected.tolist()
    assert got.shape[1] > 2 and len({tuple(row) for row in got.tolist()}) > 1, "the case must generate varied tokens"


def test_bf16_language_model_and_fp16_refusal(saved):
    directory, _ = saved
    ours = load_instructblip(directory, language_model_dtype="bf16")
    assert (ours.language_model.shared.weight.dtype == torch.bfloat16
            and ours.qformer.embeddings.layernorm.weight.dtype == torch.float32)
    pixel_values, qformer_ids, qformer_mask, prompt, prompt_mask, labels = inputs()
    out = ours(pixel_values=pixel_values, qformer_input_ids=qformer_ids, qformer_attention_mask=qformer_mask,
               input_ids=prompt, attention_mask=prompt_mask, labels=labels)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="fp16 for the T5 language model is refused"):
        load_instructblip(directory, language_model_dtype="fp16")


def test_qformer_regex_selects_what_peft_selects(saved):
    from peft import LoraConfig, get_peft_model

    directory, reference = saved
    pattern = r"qformer.*\.(query|key|value)"
    injected = inject_lora(load_instructblip(directory), LoRAConfig(pattern, r=2))
    peft_model = get_peft_model(copy.deepcopy(reference), LoraConfig(target_modules=pattern, r=2))
    assert sorted(injected) == sorted(peft_lora_modules(peft_model))
    assert len(injected) == 2 * (3 + 3) and all(p.startswith("qformer.") for p in injected)
    with pytest.raises(ValueError, match="intermediate_query, a ModuleDict"):
        inject_lora(load_instructblip(directory), LoRAConfig(r"qformer.*(query|key|value)", r=2))
