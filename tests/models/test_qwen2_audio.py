"""models/qwen2_audio.py against transformers' Qwen2AudioForConditionalGeneration on a tiny random model
saved in shards: logits and loss with clips of different lengths (masked), right and left padding,
gradients, greedy generation token for token, the chat format, bf16, and the refusals."""

import jinja2
import pytest
import torch
import transformers

from models import load_qwen2_audio
from models.checkpoint import Checkpoint
from models.qwen2_audio import (audio_token_count, chat_prompt, expand_audio_placeholder, language_side_linear_paths,
                                load_qwen2_audio_tokenizer)
from tests.conftest import randomize
from tests.lora_fixtures import give_lora_B_values

AUDIO_TOKEN, VOCAB, N_MELS, POSITIONS = 5, 96, 16, 40  # the reference wants exactly 2 * POSITIONS = 80 frames
VALID_FRAMES = [60, 41, 27]  # one clip per row, each masked to its own length
PROMPTS, ANSWERS = [4, 7, 2], [3, 1, 5]  # text tokens before the clip, and scored tokens after it


def reference_model(seed=1):
    config = transformers.Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=N_MELS, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                          encoder_ffn_dim=64, max_source_positions=POSITIONS),
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, rms_norm_eps=1e-5, eos_token_id=2, pad_token_id=0),
        audio_token_index=AUDIO_TOKEN)
    reference = transformers.Qwen2AudioForConditionalGeneration(config)
    randomize(reference, seed)  # every weight random: unit norms and zero biases would hide a misplaced one
    return reference.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = reference_model()
    directory = tmp_path_factory.mktemp("qwen2_audio")
    reference.save_pretrained(directory, max_shard_size="40KB")
    assert len(set(Checkpoint.open(directory).weight_map.values())) > 3, "the checkpoint must be sharded"
    return load_qwen2_audio(directory), reference, directory


def clips(seed=3):
    features = torch.randn(len(VALID_FRAMES), N_MELS, 2 * POSITIONS, generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(2 * POSITIONS)[None, :] < torch.tensor(VALID_FRAMES)[:, None]).long()  # (N, T)
    return features, mask


def batch(left: bool, seed=4, answers=ANSWERS):
    """Rows [prompt, <|AUDIO|> x n, answer], padded on one side; labels on the answers only."""
    generator = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for n_prompt, frames, n_answer in zip(PROMPTS, VALID_FRAMES, answers):
        text = torch.randint(6, VOCAB, (n_prompt + n_answer,), generator=generator).tolist()
        rows.append(text[:n_prompt] + [AUDIO_TOKEN] * audio_token_count(frames) + text[n_prompt:])
        labels.append([-100] * (len(rows[-1]) - n_answer) + text[n_prompt:])
    width = max(map(len, rows))
    ids, mask, lab = (torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long),
                      torch.full((len(rows), width), -100))
    for i, (row, label) in enumerate(zip(rows, labels)):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span], lab[i, span] = torch.tensor(row), 1, torch.tensor(label)
    return ids, mask, lab


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_logits_loss_and_gradients_equal_transformers(pair, left):
    ours, reference, _ = pair
    features, feature_mask = clips()
    input_ids, mask, labels = batch(left)
    inputs = dict(input_ids=input_ids, attention_mask=mask, input_features=features,
                  feature_attention_mask=feature_mask)
    out = ours(**inputs, labels=labels)
    expected = reference(**inputs, labels=labels)
    real = mask.bool()  # padding positions are never read; the two fill them differently
    torch.testing.assert_close(out.logits[real], expected.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    for name in ("linear.weight", "linear.bias"):  # the gradient reaches the audio through the placement
        ref_grad = reference.model.multi_modal_projector.get_parameter(name).grad
        torch.testing.assert_close(ours.multi_modal_projector.get_parameter(name).grad, ref_grad, atol=1e-5, rtol=1e-4)
    assert ours.multi_modal_projector.linear.weight.grad.abs().sum() > 0
    ours.zero_grad(), reference.zero_grad()

    # the batch's longest clip + 2 frames instead of the reference's fixed 80: the same valid outputs
    short = ours(**dict(inputs, input_features=features[..., : max(VALID_FRAMES) + 2],
                        feature_attention_mask=feature_mask[:, : max(VALID_FRAMES) + 2]))
    torch.testing.assert_close(short.logits[real], expected.logits[real], atol=1e-5, rtol=1e-5)


def test_the_audio_lands_on_its_own_placeholders(pair):
    """Each row alone, unpadded, gives the batch's logits: clip n went to row n's placeholders."""
    ours, _, _ = pair
    features, feature_mask = clips()
    input_ids, mask, _ = batch(left=False)
    logits = ours(input_ids=input_ids, attention_mask=mask, input_features=features,
                  feature_attention_mask=feature_mask).logits
    for row, n in enumerate(mask.sum(1).tolist()):
        alone = ours(input_ids[row:row + 1, :n], features[row:row + 1],
                     feature_attention_mask=feature_mask[row:row + 1]).logits[0]
        torch.testing.assert_close(logits[row, :n], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="hold 32 audio placeholders but the clips give 17 audio rows"):
        ours(input_ids, features[1:], mask, feature_mask[1:])  # a clip missing


def test_greedy_generation_equals_transformers(pair):
    ours, reference, _ = pair
    features, feature_mask = clips()
    input_ids, mask, _ = batch(left=True, answers=[1, 1, 1])  # each row ends with a text token after its clip
    prompt_width = input_ids.shape[1]
    inputs = dict(input_ids=input_ids, attention_mask=mask, input_features=features,
                  feature_attention_mask=feature_mask)
    n = 8
    free = ours.generate(**inputs, max_new_tokens=n, eos_token_id=())
    rows = free.tolist()  # as eos, a token one row emits early and another never: one row stops, one does not
    eos = next(t for i, row in enumerate(rows) for t in row[: n - 2]
               if any(t not in other for other in rows[:i] + rows[i + 1:]))
    reference.generation_config.eos_token_id = eos
    reference.generation_config.pad_token_id = 0
    expected = reference.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=n,
                                  min_new_tokens=0)[:, prompt_width:]
    tokens = ours.generate(**inputs, max_new_tokens=n, eos_token_id=eos)
    assert tokens.tolist() == expected.tolist()
    assert any(eos in row and row.index(eos) < n - 1 for row in tokens.tolist())


def test_greedy_generation_at_batch_one_stops_at_any_listed_eos(pair):
    """One clip and its prompt alone, no mask, and two eos ids (Qwen2-Audio-7B-Instruct's generation_config.json lists
    <|endoftext|> and <|im_end|>): the second listed id, first emitted at step 2, ends the generation there."""
    ours, reference, _ = pair
    features, feature_mask = clips()
    input_ids, mask, _ = batch(left=True, answers=[1, 1, 1])
    row = 1  # row 0 repeats one token from the start: no step to stop at that an earlier step would not take
    inputs = dict(input_ids=input_ids[row:row + 1, -int(mask[row].sum()):], input_features=features[row:row + 1],
                  feature_attention_mask=feature_mask[row:row + 1])
    n = 8
    free = ours.generate(**inputs, max_new_tokens=n, eos_token_id=())[0].tolist()
    step = next(i for i in range(2, n - 1) if free[i] not in free[:i])  # a token not emitted before it
    late = next((t for t in free[step + 1:] if t not in free[:step + 1]), VOCAB - 1)  # listed first, never reached
    reference.generation_config.eos_token_id = [late, free[step]]
    reference.generation_config.pad_token_id = 0
    expected = reference.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=0)
    tokens = ours.generate(**inputs, max_new_tokens=n, eos_token_id=(late, free[step]))
    assert tokens.tolist() == expected[:, inputs["input_ids"].shape[1]:].tolist() == [free[:step + 1]]


def test_bf16_language_model_beside_an_fp32_tower(pair):
    ours, _, directory = pair
    half = load_qwen2_audio(directory, language_model_dtype="bf16")
    assert {p.dtype for p in half.language_model.parameters()} == {torch.bfloat16}
    assert ({p.dtype for p in half.audio_tower.parameters()}
            | {p.dtype for p in half.multi_modal_projector.parameters()}) == {torch.float32}
    features, feature_mask = clips()
    input_ids, mask, labels = batch(left=False)
    lm = half.language_model  # the two vocabulary-sized tables, frozen, stay 16-bit
    assert lm.model.embed_tokens.weight.dtype == lm.lm_head.weight.dtype == torch.bfloat16
    out = half(input_ids, features, mask, feature_mask, labels)  # transformers' positional order
    assert out.loss.dtype == torch.float32  # each chunk of bf16 logits upcast before the softmax
    assert out.logits.dtype == torch.bfloat16
    full = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, full, atol=1e-6, rtol=1e-6)  # the reference's upcast of bf16 logits
    torch.testing.assert_close(out.loss, ours(input_ids, features, mask, feature_mask, labels).loss,
                               atol=0.1, rtol=0.05)


def test_the_label_only_training_loss_equals_the_full_logits_loss_and_gradients(pair):
    """LoRA on the tower and on the language model's q/k/v/o: the loss from the answer positions alone (in
    chunks of 2) against the cross entropy of the full (B, L, V) logits, and every LoRA gradient."""
    from lora import LoRAConfig, inject_lora, mark_only_lora_trainable

    _, _, directory = pair
    model = load_qwen2_audio(directory)
    inject_lora(model, LoRAConfig([r"audio_tower.*self_attn\.(q|k|v|out)_proj",
                                   r"language_model.*self_attn\.(q|k|v|o)_proj"], r=2))
    mark_only_lora_trainable(model, also=["multi_modal_projector"])
    give_lora_B_values(model, 0.2)  # B starts at zero: give A a gradient to compare
    model.language_model.loss_chunk_size = 2
    features, feature_mask = clips()
    input_ids, mask, labels = batch(left=True)
    inputs = dict(input_ids=input_ids, attention_mask=mask, input_features=features,
                  feature_attention_mask=feature_mask)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    losses, grads = [], []
    for label_only in (True, False):
        out = model(**inputs, labels=labels if label_only else None)
        loss = out.loss if label_only else torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1), labels.masked_fill(mask == 0, -100)[:, 1:].flatten())
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(trainable.values())))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    for name, new, old in zip(trainable, *grads):
        torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-6, msg=name)
        assert old.abs().sum() > 0, name


def test_one_placeholder_per_clip_and_a_tower_only_checkpoint_are_refused(pair, tmp_path):
    ours, _, directory = pair
    features, feature_mask = clips()
    legacy = torch.tensor([[7, AUDIO_TOKEN, 8], [9, AUDIO_TOKEN, 8], [7, AUDIO_TOKEN, 9]])
    with pytest.raises(ValueError, match="legacy spelling, one per clip"):
        ours(legacy, features, None, feature_mask)
    # the audio-text demo's kind of checkpoint: a qwen2_audio config holding only the tower
    from data.demo_models import write_audio_tower
    write_audio_tower(tmp_path / "tower", seed=0)
    with pytest.raises(ValueError, match="no text_config: the whole Qwen2-Audio needs"):
        load_qwen2_audio(tmp_path / "tower")


def test_load_qwen2_audio_is_a_documented_contract():
    import inspect

    import models
    import models.qwen2_audio
    assert models.load_qwen2_audio is models.qwen2_audio.load_qwen2_audio  # the package exports the port itself
    assert "Qwen2-Audio" in inspect.getdoc(models.load_qwen2_audio)


def test_chat_prompt_is_the_instruct_models_template():
    """transformers' Qwen2AudioProcessor.default_chat_template (the Instruct checkpoint's chat_template.json)."""
    template = transformers.Qwen2AudioProcessor.default_chat_template.fget(None)
    messages = [{"role": "user", "content": [{"type": "audio", "audio_url": "a.wav"},
                                             {"type": "text", "text": "How many beeps?"}]}]
    rendered = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    assert chat_prompt("How many beeps?") == rendered


def test_placeholder_count_is_the_towers_output_length(pair):
    ours, _, _ = pair
    for frames in (3, 4, 27, 41, 60, 80):
        mask = torch.ones(1, frames, dtype=torch.bool)
        assert (audio_token_count(frames) == int(ours.audio_tower.output_lengths(mask))
                == (((frames - 1) // 2 + 1) - 2) // 2 + 1)
    assert expand_audio_placeholder([1, AUDIO_TOKEN, 2], AUDIO_TOKEN, 3) == [1, 5, 5, 5, 2]
    with pytest.raises(ValueError, match="holds 2 <\\|AUDIO\\|> tokens"):
        expand_audio_placeholder([AUDIO_TOKEN, AUDIO_TOKEN], AUDIO_TOKEN, 3)


def test_language_side_paths_name_the_language_models_linears(pair):
    ours, _, directory = pair
    paths = language_side_linear_paths(Checkpoint.open(directory).config)
    ours_linear = {f"language_model.{p}" for p, m in ours.language_model.named_modules()
                   if isinstance(m, torch.nn.Linear)}
    assert set(paths) == ours_linear | {"multi_modal_projector.linear"}
    # Qwen2's default depth
    assert "language_model.model.layers.31.self_attn.q_proj" in language_side_linear_paths(None)


def test_tokenizer_needs_the_chat_tokens(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    (tmp_path / "config.json").write_text("{}")
    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="lacks <\\|AUDIO\\|>"):
        load_qwen2_audio_tokenizer(tmp_path)


def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(tmp_path):
    """The same four examples through collate_audio_qa padded and packed (two rows, examples reordered, clips
    placed per example): loss and every trainable gradient (LoRA on the tower and the language model, the
    projector) equal within 1e-6 in fp32."""
    from data.audio_qa import collate_audio_qa
    from lora import LoRAConfig, inject_lora, mark_only_lora_trainable
    from tests.data.test_packing import audio_items
    from tests.qwen2_audio_fixtures import save_tiny_qwen2_audio, tokenizer_for

    save_tiny_qwen2_audio(tmp_path, max_shard_size="200KB")
    model = load_qwen2_audio(tmp_path)
    targets = [r"audio_tower.*self_attn\.(q|k|v|out)_proj", r"language_model.*self_attn\.(q|k|v|o)_proj"]
    inject_lora(model, LoRAConfig(targets, r=2))
    mark_only_lora_trainable(model, also=["multi_modal_projector"])
    give_lora_B_values(model, 0.2)  # B starts at zero: give A a gradient to compare
    items, tokenizer = audio_items(), tokenizer_for()
    padded = collate_audio_qa(items, tokenizer)
    lengths = padded["attention_mask"].sum(1).tolist()
    packed = collate_audio_qa(items, tokenizer, pack=lengths[1] + lengths[2])
    assert packed["input_ids"].shape[0] == 2 and packed["order"] != sorted(packed["order"])
    keys = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "labels")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    results = []
    for batch, extra in ((padded, ()), (packed, ("position_ids", "segment_ids"))):
        loss = model(**{key: batch[key] for key in keys + extra}).loss
        results.append((loss, torch.autograd.grad(loss, list(trainable.values()))))
    (loss, grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, loss, atol=1e-6, rtol=1e-6)
    for name, new, old in zip(trainable, packed_grads, grads):
        torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-6, msg=name)
        assert old.abs().sum() > 0, name
    blind = model(**{key: packed[key] for key in keys}).loss  # the same rows without their segments: not equal
    assert abs(blind.item() - loss.item()) > 1e-4
