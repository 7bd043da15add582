"""InstructBLIP with a LLaMA (Vicuna) language model: the composed model against transformers'
InstructBlipForConditionalGeneration with a llama text_config (sharded save), its tokenizer, the
decoder-only batches and the token-budget check, LoRA selection, and train.py end to end."""

import copy
import json

import pytest
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

from data.demo_models import SPECIAL_TOKENS, build_wordpiece
from data.instructblip import (VQADataset, check_texts, collate_vqa, language_model_layout, read_vqa_manifest)
from lora import LoRAConfig, inject_lora, mark_only_lora_trainable
from lora.summary import lora_placement
from models import load_instructblip, load_instructblip_tokenizers
from tests.lora_fixtures import give_lora_B_values, peft_lora_modules
from tests.data.test_instructblip_data import ROWS, SIZE, good_manifest, qformer_tokenizer, t5_tokenizer
from tests.conftest import randomize

Q, IMAGE_TOKEN, VOCAB = 4, 119, 120
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "[PAD]"]  # ids 0-3, as LLaMA's <unk> <s> </s> and Vicuna's added [PAD]


def llama_tokenizer(texts: list[str], bos: str = "<s>") -> Tokenizer:
    """A tiny LLaMA-style tokenizer.json: a BOS in front (InstructBLIP-Vicuna's BOS is </s>), no eos after."""
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t.lower())})
    vocab = {token: i for i, token in enumerate(LLAMA_SPECIALS + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens(LLAMA_SPECIALS)
    return tok


def write_tokenizers(directory, texts, bos="<s>"):
    (directory / "qformer_tokenizer").mkdir(parents=True, exist_ok=True)
    (directory / "qformer_tokenizer" / "tokenizer.json").write_text(
        build_wordpiece(texts, SPECIAL_TOKENS, "[UNK]", "[CLS] $A [SEP]").to_str())
    (directory / "tokenizer.json").write_text(llama_tokenizer(texts, bos).to_str())


def reference_config(vocab=VOCAB, qformer_vocab=100, image_size=32, **text):
    from transformers import InstructBlipConfig, LlamaConfig

    return InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        qformer_config=dict(vocab_size=qformer_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, cross_attention_frequency=1),
        text_config=LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                pad_token_id=3, **text).to_dict(),
        num_query_tokens=Q, image_token_index=IMAGE_TOKEN,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import InstructBlipForConditionalGeneration

    torch.manual_seed(0)
    reference = InstructBlipForConditionalGeneration(reference_config()).eval()
    randomize(reference, 1, scale=0.2)  # every parameter random: default inits (zero biases, unit norms) hide bugs
    directory = tmp_path_factory.mktemp("instructblip_vicuna")
    reference.save_pretrained(directory, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    write_tokenizers(directory, [p + " " + a for _, p, a in ROWS], bos="</s>")  # Vicuna's BOS is </s>
    return directory, reference


def images(seed, batch):
    g = torch.Generator().manual_seed(seed)
    qformer_mask = torch.ones(batch, 6, dtype=torch.long)
    qformer_mask[1, 4:] = 0
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(5, 100, (batch, 6), generator=g), qformer_mask


def training_batch(seed=0):
    """[BOS prompt answer eos] right-padded, labels -100 on the prompt and padding (as the collate makes)."""
    g = torch.Generator().manual_seed(seed)
    prompt_lengths, answer_lengths = [4, 2, 3], [3, 4, 1]
    width = max(p + a for p, a in zip(prompt_lengths, answer_lengths))
    ids = torch.full((3, width), 3)
    mask, labels = torch.zeros(3, width, dtype=torch.long), torch.full((3, width), -100)
    for row, (p, a) in enumerate(zip(prompt_lengths, answer_lengths)):
        tokens = torch.randint(4, IMAGE_TOKEN, (p + a,), generator=g)
        ids[row, : p + a], mask[row, : p + a] = tokens, 1
        labels[row, p: p + a] = tokens[p:]
    return ids, mask, labels


def with_placeholders(ids, mask, labels=None):
    """transformers 5's spelling: Q image tokens in front of the text (labels -100 there)."""
    batch = ids.shape[0]
    out = [torch.cat([torch.full((batch, Q), IMAGE_TOKEN), ids], 1),
           torch.cat([torch.ones(batch, Q, dtype=torch.long), mask], 1)]
    return out + ([torch.cat([torch.full((batch, Q), -100), labels], 1)] if labels is not None else [])


def test_text_logits_and_loss_equal_the_reference(saved):
    directory, reference = saved
    ours = load_instructblip(directory)
    assert ours.config.decoder_only and type(ours.language_model).__name__ == "LlamaForCausalLM"
    pixel_values, qformer_ids, qformer_mask = images(0, 3)
    ids, mask, labels = training_batch()
    out = ours(pixel_values=pixel_values, qformer_input_ids=qformer_ids, qformer_attention_mask=qformer_mask,
               input_ids=ids, attention_mask=mask, labels=labels)
    ref_ids, ref_mask, ref_labels = with_placeholders(ids, mask, labels)
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values, qformer_input_ids=qformer_ids,
                             qformer_attention_mask=qformer_mask, input_ids=ref_ids, attention_mask=ref_mask,
                             labels=ref_labels)
    assert out.logits.shape == (3, ids.shape[1], VOCAB)  # the text positions only
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], expected.logits[:, Q:][real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["loss"], expected.loss, atol=1e-5, rtol=1e-5)
    # the loss is next-token cross entropy on the answer tokens only
    shifted = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                ignore_index=-100)
    torch.testing.assert_close(out.loss, shifted)


def test_training_projects_only_the_answer_positions_onto_the_vocabulary(saved):
    """The loss meets the vocabulary at the scored positions alone, never at the Q query positions nor the
    prompt; logits read afterwards cover the text positions only; and the loss equals the cross entropy of
    the full [queries; text] logits, gradients to the Q-Former's LoRA included."""
    directory, _ = saved
    ours = load_instructblip(directory)
    inject_lora(ours, LoRAConfig(r"qformer.*\.(query|key|value)", r=2))
    mark_only_lora_trainable(ours)
    give_lora_B_values(ours, 0.1)  # B starts at zero: give A a gradient to compare
    lm = ours.language_model
    lm.loss_chunk_size = 3
    rows, head = [], lm.logits
    lm.logits = lambda hidden: (rows.append(tuple(hidden.shape[:-1])), head(hidden))[1]  # forward's self.logits
    pixel_values, qformer_ids, qformer_mask = images(0, 3)
    ids, mask, labels = training_batch()
    kwargs = dict(pixel_values=pixel_values, qformer_input_ids=qformer_ids, qformer_attention_mask=qformer_mask,
                  input_ids=ids, attention_mask=mask)
    lora = [p for p in ours.parameters() if p.requires_grad]
    out = ours(**kwargs, labels=labels)
    grads = torch.autograd.grad(out.loss, lora)
    scored = int((labels[:, 1:] != -100).sum())
    assert sorted(rows) == sorted(2 * [(3,), (3,), (scored - 6,)]), "chunks of the scored rows, each again in backward"
    rows.clear()
    assert out.logits.shape == (3, ids.shape[1], VOCAB) and rows == [(3, ids.shape[1])], (
        "read logits: the text rows only")

    embeds, full_mask = ours.language_model_inputs(pixel_values, qformer_ids, qformer_mask, ids, mask)
    full = head(lm.model(embeds, full_mask))  # (B, Q + L, V): what the forward computed before models/lm_loss.py
    expected = torch.nn.functional.cross_entropy(full[:, Q:-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    for grad, reference in zip(grads, torch.autograd.grad(expected, lora)):
        torch.testing.assert_close(grad, reference, atol=1e-6, rtol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads)


def test_greedy_generation_equals_the_reference_after_left_padded_prompts(saved):
    directory, reference = saved
    ours = load_instructblip(directory)
    pixel_values, qformer_ids, qformer_mask = images(3, 3)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(4, IMAGE_TOKEN, (3, 5), generator=g)
    prompt_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])  # left padding: a gap after the queries
    prompt = prompt.masked_fill(prompt_mask == 0, 3)
    kwargs = dict(pixel_values=pixel_values, qformer_input_ids=qformer_ids, qformer_attention_mask=qformer_mask)
    n = 8
    free = ours.generate(**kwargs, input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=n, eos_token_id=())
    eos = next(t for t in free[0, 2:].tolist() if any(t not in row for row in free[1:].tolist()))
    ref_ids, ref_mask = with_placeholders(prompt, prompt_mask)
    with torch.no_grad():
        expected = reference.generate(**kwargs, input_ids=ref_ids, attention_mask=ref_mask, max_new_tokens=n,
                                      do_sample=False, num_beams=1, eos_token_id=eos)
    got = ours.generate(**kwargs, input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=n, eos_token_id=eos)
    assert got.tolist() == expected[:, Q + prompt.shape[1]:].tolist()  # ours: the new tokens only
    assert any(eos in row and row.index(eos) < got.shape[1] - 1 for row in got.tolist()), "a row must stop early"
    assert len({tuple(row) for row in got.tolist()}) > 1, "the case must generate varied tokens"


def test_greedy_generation_at_batch_one_stops_at_any_listed_eos(saved):
    """One image and its prompt, no padding, and two eos ids (a LLaMA-family checkpoint's generation_config.json
    may list several: models/tokenizer.py SpecialTokens): the second listed id, first emitted at step 2, stops it."""
    directory, reference = saved
    ours = load_instructblip(directory)
    pixel_values, qformer_ids, qformer_mask = images(5, 2)
    kwargs = dict(pixel_values=pixel_values[:1], qformer_input_ids=qformer_ids[:1],
                  qformer_attention_mask=qformer_mask[:1])
    prompt = torch.randint(4, IMAGE_TOKEN, (1, 4), generator=torch.Generator().manual_seed(6))
    n = 8
    free = ours.generate(**kwargs, input_ids=prompt, max_new_tokens=n, eos_token_id=())[0].tolist()
    step = next(i for i in range(2, n - 1) if free[i] not in free[:i])  # a token not emitted before it
    late = next((t for t in free[step + 1:] if t not in free[:step + 1]), VOCAB - 1)  # listed first, never reached
    ref_ids, ref_mask = with_placeholders(prompt, torch.ones_like(prompt))
    with torch.no_grad():
        expected = reference.generate(**kwargs, input_ids=ref_ids, attention_mask=ref_mask, max_new_tokens=n,
                                      do_sample=False, num_beams=1, eos_token_id=[late, free[step]])
    got = ours.generate(**kwargs, input_ids=prompt, max_new_tokens=n, eos_token_id=(late, free[step]))
    assert got.tolist() == expected[:, Q + prompt.shape[1]:].tolist() == [free[:step + 1]]


def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(saved, tmp_path):
    """The same four examples through collate_vqa padded and packed (rows of [Q query slots; BOS prompt answer eos]
    end to end, examples reordered): loss and every trainable gradient (LoRA on the Q-Former and on the language
    model's attention, the projection) equal within 1e-6 in fp32; T5 is refused."""
    directory, _ = saved
    model = load_instructblip(directory)
    targets = [r"qformer.*\.(query|key|value)", r"language_model.*self_attn\.(q|k|v|o)_proj"]
    inject_lora(model, LoRAConfig(targets, r=2))
    mark_only_lora_trainable(model, also=["language_projection"])
    give_lora_B_values(model, 0.1)  # B starts at zero: give A a gradient to compare
    dataset = VQADataset(read_vqa_manifest(good_manifest(tmp_path)))
    items = [dataset[i] for i in (2, 3, 0, 1)]
    qformer_tok, lm_tok = load_instructblip_tokenizers(directory)

    def collate(**kw):
        return collate_vqa(items, 32, qformer_tok, lm_tok, decoder_only=True, **{"num_query_tokens": Q, **kw})

    padded = collate()
    lengths = [Q + n for n in padded["attention_mask"].sum(1).tolist()]
    assert lengths[0] == lengths[1] > lengths[2] == lengths[3]
    packed = collate(pack=lengths[0] + lengths[2])  # first fit: rows [0, 2] and [1, 3], no padding
    assert packed["order"] == [0, 2, 1, 3] and packed["input_ids"].shape == (2, lengths[0] + lengths[2])
    assert packed["padding_share"] < padded["padding_share"]
    assert padded["padding_tokens"] == padded["lm_tokens"] - sum(lengths)
    assert packed["paths"] == [padded["paths"][i] for i in packed["order"]]
    keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask", "labels")
    packed_keys = keys + ("position_ids", "segment_ids")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    results = []
    for batch, batch_keys in ((padded, keys), (packed, packed_keys)):
        loss = model(**{key: batch[key] for key in batch_keys}).loss
        results.append((loss, torch.autograd.grad(loss, list(trainable.values()))))
    (loss, grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, loss, atol=1e-6, rtol=1e-6)
    for name, new, old in zip(trainable, packed_grads, grads):
        torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-6, msg=name)
        assert old.abs().sum() > 0, name
    shuffled = dict(packed, pixel_values=padded["pixel_values"])  # images left in the manifest's order: not equal
    assert abs(model(**{key: shuffled[key] for key in packed_keys}).loss.item() - loss.item()) > 1e-4
    with pytest.raises(ValueError, match="collate with num_query_tokens=4, the model.s config.num_query_tokens"):
        model(**{key: collate(pack=200, num_query_tokens=3)[key] for key in packed_keys})
    with pytest.raises(ValueError, match="packing needs a decoder-only language model"):
        collate_vqa(items, 32, qformer_tokenizer(), t5_tokenizer(), pack=200)


def test_bf16_language_model_trains_fp32_lora_on_the_qformer(saved):
    directory, _ = saved
    ours = load_instructblip(directory, language_model_dtype="bf16")
    assert {p.dtype for p in ours.language_model.parameters()} == {torch.bfloat16}
    assert ours.qformer.embeddings.layernorm.weight.dtype == torch.float32
    inject_lora(ours, LoRAConfig(r"qformer.*\.(query|key|value)", r=2))
    mark_only_lora_trainable(ours)
    lora = [p for p in ours.parameters() if p.requires_grad]
    give_lora_B_values(ours, 0.1)  # B starts at zero: give A a gradient to receive
    pixel_values, qformer_ids, qformer_mask = images(0, 3)
    ids, mask, labels = training_batch()
    out = ours(pixel_values=pixel_values, qformer_input_ids=qformer_ids, qformer_attention_mask=qformer_mask,
               input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_qformer_regex_selects_what_peft_selects_and_a_wide_one_spreads_into_the_lm(saved):
    from peft import LoraConfig, get_peft_model

    directory, reference = saved
    for pattern in (r"qformer.*\.(query|key|value)", r".*(q|k|v)_proj"):
        injected = inject_lora(load_instructblip(directory), LoRAConfig(pattern, r=2))
        peft_model = get_peft_model(copy.deepcopy(reference), LoraConfig(target_modules=pattern, r=2))
        assert sorted(injected) == sorted(peft_lora_modules(peft_model)), pattern
    qformer_only = inject_lora(load_instructblip(directory), LoRAConfig(r"qformer.*\.(query|key|value)", r=2))
    assert len(qformer_only) == 2 * (3 + 3) and all(p.startswith("qformer.") for p in qformer_only)
    wide = load_instructblip(directory)
    inject_lora(wide, LoRAConfig(r".*(q|k|v)_proj", r=2))
    assert lora_placement(wide).endswith("in 6 layers, all inside language_model")  # the line train.py prints


def test_vicuna_tokenizer_loads_from_tokenizer_json_and_refuses_sentencepiece_only(saved, tmp_path):
    directory, _ = saved
    qformer, lm = load_instructblip_tokenizers(directory)
    encoding = lm.encode("What colour is the shape?")
    assert encoding.tokens[0] == "</s>" and encoding.special_tokens_mask[0] == 1  # Vicuna's BOS
    assert encoding.tokens[-1] == "?" and language_model_layout(lm) == "decoder-only"
    assert lm.padding["pad_token"] == "[PAD]" and qformer.encode("what").tokens[0] == "[CLS]"

    only_spm = tmp_path / "spm"
    only_spm.mkdir()
    for name in ("config.json", "qformer_tokenizer"):
        (only_spm / name).symlink_to(directory / name)
    (only_spm / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    with pytest.raises(FileNotFoundError, match=r"no LLaMA tokenizer\.json.*tokenizer\.model.*save_pretrained"):
        load_instructblip_tokenizers(only_spm)
    (only_spm / "tokenizer.json").write_text(t5_tokenizer().to_str())  # a T5 tokenizer in a Vicuna checkpoint
    with pytest.raises(ValueError, match=r"spm/tokenizer\.json: its post-processor writes 0 token\(s\) before and 1 "
                                         r"after every text.*use the template '<s> \$A'"):
        load_instructblip_tokenizers(only_spm)


# ---- decoder-only batches and the token budgets -------------------------------------------------------


def vicuna_tokenizer():
    tok = llama_tokenizer([p + " " + a for _, p, a in ROWS])
    tok.enable_padding(pad_id=3, pad_token="[PAD]")
    return tok


def own(tok, text, special=True):
    alone = Tokenizer.from_str(tok.to_str())
    alone.no_padding()
    return alone.encode(text, add_special_tokens=special).ids


def test_collate_makes_one_causal_sequence_and_a_left_padded_prompt(tmp_path):
    dataset = VQADataset(read_vqa_manifest(good_manifest(tmp_path)))
    tok = vicuna_tokenizer()
    batch = collate_vqa([dataset[i] for i in range(4)], SIZE, qformer_tokenizer(), lm_tokenizer=tok)
    eos = tok.token_to_id("</s>")
    prompts = [own(tok, p) for _, p, _ in ROWS]
    answers = [own(tok, a, special=False) + [eos] for _, _, a in ROWS]
    assert all(p[0] == tok.token_to_id("<s>") for p in prompts) and all(len(a) >= 2 for a in answers)
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    assert batch["input_ids"].tolist() == [p + a + [3] * (width - len(p) - len(a)) for p, a in zip(prompts, answers)]
    assert batch["attention_mask"].tolist() == [[1] * (len(p) + len(a)) + [0] * (width - len(p) - len(a))
                                                for p, a in zip(prompts, answers)]
    assert batch["labels"].tolist() == [[-100] * len(p) + a + [-100] * (width - len(p) - len(a))
                                        for p, a in zip(prompts, answers)]
    longest = max(map(len, prompts))
    assert batch["prompt_input_ids"].tolist() == [[3] * (longest - len(p)) + p for p in prompts]
    assert batch["prompt_attention_mask"].tolist() == [[0] * (longest - len(p)) + [1] * len(p) for p in prompts]
    t5_batch = collate_vqa([dataset[i] for i in range(4)], SIZE, qformer_tokenizer(), t5_tokenizer())
    assert "prompt_input_ids" not in t5_batch  # the T5 layout is unchanged
    with pytest.raises(ValueError, match="decoder_only=True but the language model's tokenizer is encoder-decoder"):
        collate_vqa([dataset[0]], SIZE, qformer_tokenizer(), t5_tokenizer(), decoder_only=True)
    with pytest.raises(ValueError, match="decoder_only=False but the language model's tokenizer is decoder-only"):
        collate_vqa([dataset[0]], SIZE, qformer_tokenizer(), lm_tokenizer=tok, decoder_only=False)


@pytest.mark.parametrize("lm", ["t5", "llama"])
def test_check_texts_finds_every_line_the_collate_would_refuse(tmp_path, lm):
    examples = read_vqa_manifest(good_manifest(tmp_path))
    dataset = VQADataset(examples)
    tok = t5_tokenizer() if lm == "t5" else vicuna_tokenizer()
    name = "T5" if lm == "t5" else "LLaMA"
    answer_lengths = [len(own(tok, a)) if lm == "t5" else len(own(tok, a, special=False)) + 1 for _, _, a in ROWS]
    budget = max(answer_lengths) - 1  # the longest answer is one token over
    problems = check_texts(examples, qformer_tokenizer(), tok, max_answer_tokens=budget)
    over = [i for i, n in enumerate(answer_lengths) if n > budget]
    assert [e.line for e, _ in problems] == [i + 1 for i in over]
    assert problems[0][1].startswith(f"the answer in {name} tokens is {budget + 1} tokens long, "
                                     f"more than max_answer_tokens={budget}")
    for i in range(4):  # the collate agrees line by line
        if i in over:
            with pytest.raises(ValueError, match=f"answer in {name} tokens"):
                collate_vqa([dataset[i]], SIZE, qformer_tokenizer(), tok, max_answer_tokens=budget)
        else:
            collate_vqa([dataset[i]], SIZE, qformer_tokenizer(), tok, max_answer_tokens=budget)
    assert check_texts(examples, qformer_tokenizer(), tok, max_answer_tokens=budget + 1) == []
    tok.enable_truncation(2)  # a truncating tokenizer must not hide a long prompt
    [(example, reason), *_] = check_texts(examples, qformer_tokenizer(), tok, max_prompt_tokens=2, max_answer_tokens=50)
    assert example.line == 1 and "the prompt in Q-Former tokens is" in reason


# ---- train.py end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vicuna(tmp_path_factory):
    from transformers import InstructBlipForConditionalGeneration

    from data.demo_shapes import ensure_shapes_set

    root = tmp_path_factory.mktemp("vicuna_e2e")
    shapes = ensure_shapes_set(root / "set", n_train=32, n_eval=8, image_size=32, seed=0, verbose=False)
    texts = [line for line in open(shapes["texts"], encoding="utf-8").read().splitlines() if line.strip()]
    directory = root / "model"
    write_tokenizers(directory, texts)
    qformer_vocab = Tokenizer.from_file(str(directory / "qformer_tokenizer" / "tokenizer.json")).get_vocab_size()
    lm_vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    config = reference_config(vocab=lm_vocab + 1, qformer_vocab=qformer_vocab)
    config.image_token_index = lm_vocab
    InstructBlipForConditionalGeneration(config).save_pretrained(directory, max_shard_size="60KB")
    return {"model": str(directory), "train": shapes["train"], "eval": shapes["eval"]}


def test_train_and_eval_the_vicuna_variant_end_to_end(tiny_vicuna, tmp_path):
    import eval as evaluation
    import train

    out = tmp_path / "run"
    model, history = train.train(train.parse_args([
        "--task", "instructblip", "--targets", r"qformer.*\.(query|key|value)", "--model", tiny_vicuna["model"],
        "--train-data", tiny_vicuna["train"], "--eval-data", tiny_vicuna["eval"], "--output-dir", str(out),
        "--batch-size", "8", "--workers", "0", "--lr", "3e-3", "--warmup-steps", "1", "--max-steps", "6",
        "--eval-every", "0", "--save-every", "0", "--train-also", "language_projection"]))
    assert model.config.decoder_only
    before, after = history["before"], history["after"]
    assert after["n_examples"] == 8 and all(isinstance(s["generated"], str) for s in after["samples"])
    assert after["loss"] < before["loss"]
    assert json.loads((out / "run_config.json").read_text())["model"] == tiny_vicuna["model"]
    metrics = evaluation.main(["--checkpoint", str(out)])
    assert metrics["loss"] == pytest.approx(after["loss"], rel=1e-5)
    assert metrics["exact_match"] == pytest.approx(after["exact_match"])


def test_list_targets_shows_a_regex_spreading_into_the_lm_and_diagnose_passes(tiny_vicuna, tmp_path, capsys):
    import train

    common = ["--task", "instructblip", "--model", tiny_vicuna["model"], "--train-data", tiny_vicuna["train"],
              "--batch-size", "8", "--workers", "0"]
    assert train.main([*common, "--targets", r".*(q|k|v)_proj", "--output-dir", str(tmp_path / "a"),
                       "--list-targets"]) == 0
    printed = capsys.readouterr().out
    assert "language_model.model.layers.{0..1}.self_attn.{k,q,v}_proj" in printed and "memory for them" in printed
    assert train.main([*common, "--targets", r"qformer.*\.(query|key|value)", "--output-dir", str(tmp_path / "b"),
                       "--diagnose"]) == 0
    assert "diagnosis: healthy" in capsys.readouterr().out
