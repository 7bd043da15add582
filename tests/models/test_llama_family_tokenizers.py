"""Any LLaMA-family tokenizer (models/tokenizer.py `load_llama_tokenizer`, `read_special_tokens`; models/loading.py
`load_special_tokens`) against transformers' AutoTokenizer and GenerationConfig on tiny checkpoints written here:
Llama 3 (<|begin_of_text|> from the post-processor, <|eot_id|>, two eos in generation_config.json), SmolLM2 (no BOS,
<|im_end|>), Qwen2 (bos null), InstructBLIP-Vicuna (</s> as BOS, legacy special_tokens_map.json) and a LLaMA 2 whose
tokenizer.json writes no BOS that tokenizer_config.json asks for (read as transformers 4 read it: see `reference`).
Each tokenizer is a byte-level or SentencePiece-style BPE trained here with `tokenizers` in the pipeline of its
family, its config files spelled as the released ones are; then the ids of prompts, the batches collate_vqa builds,
and the bos/eos/pad ids are compared."""

import json

import pytest
import transformers
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordLevel
from tokenizers.trainers import BpeTrainer

from data.instructblip import VQADataset, check_texts, collate_vqa, read_vqa_manifest
from models.checkpoint import CheckpointError
from models.loading import load_instructblip_tokenizers, load_special_tokens
from models.tokenizer import load_llama_tokenizer, read_special_tokens
from tests.data.test_instructblip_data import ROWS, SIZE, good_manifest, qformer_tokenizer

CORPUS = [p + " " + a for _, p, a in ROWS] + [
    "The quick brown fox jumps over the lazy dog.", "It's 2024 and we'll see 3 shapes, won't we?",
    "Describe the image in one word.", "A red square sits left of two blue circles!", "what is shown here",
]
TEXTS = ["What colour is the shape?", "It's a blue circle, isn't it?", "how many shapes are there", "2024 dogs!"]
# The pre-tokenizer regexes of the released tokenizer.json files (Qwen2 splits digits one by one, Llama 3 by three)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"


def trained(tok: Tokenizer, specials: list[str], alphabet: list[str]) -> Tokenizer:
    tok.train_from_iterator(CORPUS, BpeTrainer(vocab_size=200, special_tokens=specials, initial_alphabet=alphabet,
                                               show_progress=False))
    return tok


def byte_level(split: str | None, nfc: bool = False) -> Tokenizer:
    """A byte-level BPE as Llama 3 and Qwen2 ship it (split: their regex), or as GPT-2 / SmolLM2 (split None)."""
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC() if nfc else None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), "isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_bpe() -> Tokenizer:
    """LLaMA 2 / Vicuna's tokenizer.json: SentencePiece BPE with byte fallback, '▁' for spaces, written by the
    normalizer (the layout transformers' conversion gave the released files); <unk> <s> </s> are ids 0-2."""
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()  # training only: pieces never span a space
    trained(tok, ["<unk>", "<s>", "</s>"], ["▁"])
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def bos_template(tok: Tokenizer, bos: str) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, tok.token_to_id(bos))])


def added_tokens_decoder(tok: Tokenizer, names: list[str]) -> dict:
    return {str(tok.token_to_id(n)): {"content": n, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True} for n in names}


def build(family: str) -> tuple[Tokenizer, dict, dict, dict, dict]:
    """(tokenizer, config.json, tokenizer_config.json, special_tokens_map.json or {}, generation_config fields)."""
    if family == "llama3":
        tok = trained(byte_level(LLAMA3_SPLIT), [], pre_tokenizers.ByteLevel.alphabet())
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tok.add_special_tokens(names)
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                                  bos_template(tok, "<|begin_of_text|>")])
        ids = {n: tok.token_to_id(n) for n in names}
        tokenizer_config = {"added_tokens_decoder": added_tokens_decoder(tok, names), "bos_token": "<|begin_of_text|>",
                            "chat_template": CHAT, "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
                            "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
        eos = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
        return tok, {"model_type": "llama", "eos_token_id": eos}, tokenizer_config, {}, {
            "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": eos}
    if family == "smollm2":
        names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0-2, as released
        tok = trained(byte_level(None), names, pre_tokenizers.ByteLevel.alphabet())
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tokenizer_config = {"add_prefix_space": False, "added_tokens_decoder": added_tokens_decoder(tok, names),
                            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": "<|im_start|>",
                            "chat_template": CHAT, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
                            "model_max_length": 8192, "pad_token": "<|im_end|>", "tokenizer_class": "GPT2Tokenizer",
                            "unk_token": "<|endoftext|>"}
        return tok, {"model_type": "llama", "eos_token_id": 2}, tokenizer_config, {}, {
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if family == "qwen2":
        tok = trained(byte_level(QWEN2_SPLIT, nfc=True), [], pre_tokenizers.ByteLevel.alphabet())
        names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok.add_special_tokens(names)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        ids = {n: tok.token_to_id(n) for n in names}
        tokenizer_config = {"add_prefix_space": False, "added_tokens_decoder": added_tokens_decoder(tok, names),
                            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
                            "chat_template": CHAT, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
                            "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
                            "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
        return tok, {"model_type": "qwen2", "eos_token_id": ids["<|im_end|>"]}, tokenizer_config, {}, {
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"]}
    # "vicuna": InstructBLIP-Vicuna as LAVIS made it, bos = eos = unk = </s>, a [PAD] added; an older save whose
    # special_tokens_map.json names the pad. "llama2": add_bos_token in the config, but no post-processor in the file.
    tok = sentencepiece_bpe()
    tok.add_special_tokens(["[PAD]"] if family == "vicuna" else [])
    bos = "</s>" if family == "vicuna" else "<s>"
    tok.post_processor = bos_template(tok, bos) if family == "vicuna" else None
    spelled = {"__type": "AddedToken", "content": None, "lstrip": False, "normalized": False, "rstrip": False,
               "single_word": False}
    tokenizer_config = {"add_bos_token": True, "add_eos_token": False, "bos_token": {**spelled, "content": bos},
                        "clean_up_tokenization_spaces": False, "eos_token": {**spelled, "content": "</s>"},
                        "legacy": False,
                        "model_max_length": 2048, "pad_token": None, "tokenizer_class": "LlamaTokenizer",
                        "unk_token": {**spelled, "content": "</s>" if family == "vicuna" else "<unk>"}}
    special_map = {"bos_token": bos, "eos_token": "</s>", "pad_token": "[PAD]", "unk_token": "</s>"} \
        if family == "vicuna" else {}
    return tok, {"model_type": "llama", "eos_token_id": 2}, tokenizer_config, special_map, {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


FAMILIES = ["llama3", "smollm2", "qwen2", "vicuna", "llama2"]


def write_checkpoint(directory, family: str) -> dict:
    """A checkpoint directory without weights: config.json (transformers' own), tokenizer.json, tokenizer_config.json,
    special_tokens_map.json where the family's release has one, generation_config.json (GenerationConfig's own)."""
    tok, model, tokenizer_config, special_map, generation = build(family)
    directory.mkdir(parents=True, exist_ok=True)
    config_class = transformers.Qwen2Config if model["model_type"] == "qwen2" else transformers.LlamaConfig
    config_class(vocab_size=tok.get_vocab_size(), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                 num_attention_heads=2, eos_token_id=model["eos_token_id"]).save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if special_map:
        (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    transformers.GenerationConfig(**generation).save_pretrained(directory)
    return json.loads((directory / "config.json").read_text())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_family")
    return {family: (root / family, write_checkpoint(root / family, family)) for family in FAMILIES}


def reference(directory, flags: bool = True):
    """transformers' AutoTokenizer and GenerationConfig of a checkpoint. flags: with tokenizer_config.json's
    add_bos_token applied; transformers 5 drops it whenever tokenizer.json exists, transformers 4's LlamaTokenizerFast
    rebuilt its post-processor from it, and so do we (models/tokenizer.py `read_special_tokens`)."""
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    if flags and "add_bos_token" in settings:
        hf.add_bos_token = settings["add_bos_token"]  # the setter rebuilds the post-processor
    return hf, transformers.GenerationConfig.from_pretrained(str(directory))


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_and_special_tokens_equal_transformers(checkpoints, family):
    directory, config = checkpoints[family]
    hf, generation = reference(directory)
    ours = load_llama_tokenizer(directory / "tokenizer.json", model_config=config)
    special = load_special_tokens(directory)
    as_is, _ = reference(directory, flags=False)  # the flag matters only where the file disagrees with it: llama2
    assert (as_is(TEXTS[0])["input_ids"] == hf(TEXTS[0])["input_ids"]) == (family != "llama2")
    for text in TEXTS:
        expected = hf(text)["input_ids"]
        assert ours.encode(text).ids == expected, (family, text)
        bos = [] if special.bos_id is None else [special.bos_id]  # what collate_vqa writes in front of a prompt
        assert bos + ours.encode(text, add_special_tokens=False).ids == expected, (family, text)
    adds_bos = hf("a")["input_ids"][:1] == [hf.bos_token_id]
    assert special.bos_id == (hf.bos_token_id if adds_bos else None)
    assert adds_bos == (family in ("llama3", "vicuna", "llama2")), "each family's own BOS rule is exercised"
    listed = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert special.eos_id == hf.eos_token_id and set(special.eos_ids) == {hf.eos_token_id, *listed}
    assert len(special.eos_ids) == len(set(special.eos_ids))
    if hf.pad_token_id is not None:
        assert special.pad_id == hf.pad_token_id
    assert ours.padding["pad_id"] == special.pad_id
    assert special.chat_template == hf.chat_template
    assert read_special_tokens(ours, directory, config) == special  # the tokenizer as loaded reads the same


def test_the_families_differ_where_they_should(checkpoints):
    """The cases are not all one case: three BOS spellings and none, and Llama 3 stops at two ids."""
    specials = {family: load_special_tokens(directory) for family, (directory, _) in checkpoints.items()}
    tokens = {family: load_llama_tokenizer(directory / "tokenizer.json")
              for family, (directory, _) in checkpoints.items()}
    bos = {f: s.bos_id and tokens[f].id_to_token(s.bos_id) for f, s in specials.items()}
    assert bos == {"llama3": "<|begin_of_text|>", "smollm2": None, "qwen2": None, "vicuna": "</s>", "llama2": "<s>"}
    eos = {f: [tokens[f].id_to_token(i) for i in s.eos_ids] for f, s in specials.items()}
    assert eos["llama3"] == ["<|eot_id|>", "<|end_of_text|>"] and eos["smollm2"] == ["<|im_end|>"]
    assert eos["qwen2"] == ["<|im_end|>", "<|endoftext|>"] and eos["vicuna"] == eos["llama2"] == ["</s>"]
    assert tokens["vicuna"].id_to_token(specials["vicuna"].pad_id) == "[PAD]", "special_tokens_map.json's pad"
    assert Tokenizer.from_file(str(checkpoints["llama2"][0] / "tokenizer.json")).encode("a").ids[:1] != \
        [specials["llama2"].bos_id], "the file itself writes no BOS: the loader and the collate add it"


@pytest.mark.parametrize("family", ["llama3", "smollm2", "llama2"])
def test_collate_writes_the_bos_and_ends_answers_with_the_models_eos(checkpoints, family, tmp_path):
    directory, config = checkpoints[family]
    hf, _ = reference(directory)
    special = load_special_tokens(directory)
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))  # as is: llama2's writes no BOS
    raw.enable_padding(pad_id=special.pad_id)
    dataset = VQADataset(read_vqa_manifest(good_manifest(tmp_path)))
    items = [dataset[i] for i in range(4)]
    batch = collate_vqa(items, SIZE, qformer_tokenizer(), raw, special_tokens=special)
    prompts = [hf(p)["input_ids"] for _, p, _ in ROWS]
    answers = [hf(a, add_special_tokens=False)["input_ids"] + [hf.eos_token_id] for _, _, a in ROWS]
    for row, mask, labels, prompt, answer in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                                 batch["labels"].tolist(), prompts, answers):
        n = sum(mask)
        assert row[:n] == prompt + answer and labels[:n] == [-100] * len(prompt) + answer
    longest = max(map(len, prompts))
    assert batch["prompt_input_ids"].tolist() == [[special.pad_id] * (longest - len(p)) + p for p in prompts]
    lengths = [len(p) for p in prompts]
    one_token = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))  # a Q-Former side that is never too long
    problems = check_texts(read_vqa_manifest(tmp_path / "m.jsonl"), one_token, raw, max_prompt_tokens=max(lengths) - 1,
                           special_tokens=special)
    assert [e.line for e, _ in problems] == \
        [i + 1 for i, n in enumerate(lengths) if n == max(lengths)], "check_texts counts the BOS as the collate does"
    if family != "llama2":  # without special tokens there is no </s> to end the answers with: told what to pass
        with pytest.raises(ValueError, match=r"has no </s>.*special_tokens=load_special_tokens\(CHECKPOINT\)"):
            collate_vqa(items, SIZE, qformer_tokenizer(), raw, decoder_only=True)


def test_an_instructblip_checkpoint_with_a_llama3_language_model(checkpoints, tmp_path):
    """load_instructblip_tokenizers and load_special_tokens read the LM's files at the root, its config in
    text_config."""
    llama3, config = checkpoints["llama3"]
    directory = tmp_path / "instructblip"
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (directory / name).write_bytes((llama3 / name).read_bytes())
    (directory / "qformer_tokenizer").mkdir()
    qformer_tokenizer().save(str(directory / "qformer_tokenizer" / "tokenizer.json"))
    (directory / "config.json").write_text(json.dumps({"model_type": "instructblip", "text_config": config}))
    qformer, lm = load_instructblip_tokenizers(directory)
    hf, _ = reference(llama3)
    assert lm.encode(TEXTS[0]).ids == hf(TEXTS[0])["input_ids"] and qformer.encode("what").tokens[0] == "[CLS]"
    assert load_special_tokens(directory) == load_special_tokens(llama3)


def rewrite(directory, name, **changes):
    path = directory / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def copy_checkpoint(source, target):
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_refusals_name_the_file_and_what_to_do(checkpoints, tmp_path):
    unknown = copy_checkpoint(checkpoints["llama3"][0], tmp_path / "unknown")
    rewrite(unknown, "tokenizer_config.json", eos_token="<|im_end|>")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json names eos_token '<\|im_end\|>', which its "
                                              r"tokenizer\.json does not hold.*download them again together"):
        load_special_tokens(unknown)

    appends = copy_checkpoint(checkpoints["llama2"][0], tmp_path / "appends")
    rewrite(appends, "tokenizer_config.json", add_eos_token=True)
    with pytest.raises(CheckpointError, match=r"appends/tokenizer_config\.json sets add_eos_token.*set add_eos_token "
                                              r"to false"):
        load_llama_tokenizer(appends / "tokenizer.json")
    t5_like = Tokenizer.from_file(str(appends / "tokenizer.json"))
    t5_like.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    t5_like.save(str(appends / "tokenizer.json"))
    settings = json.loads((appends / "tokenizer_config.json").read_text())
    del settings["add_bos_token"], settings["add_eos_token"]  # the file's post-processor decides now
    (appends / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match=r"appends/tokenizer\.json: its post-processor writes 0 token\(s\) before "
                                              r"and 1 after every text.*use the template '<s> \$A'"):
        load_llama_tokenizer(appends / "tokenizer.json")

    no_eos = copy_checkpoint(checkpoints["smollm2"][0], tmp_path / "no_eos")
    rewrite(no_eos, "tokenizer_config.json", eos_token=None)
    (no_eos / "generation_config.json").unlink()
    rewrite(no_eos, "config.json", eos_token_id=None)
    with pytest.raises(CheckpointError, match=r"no eos token.*add the model's end token as \"eos_token\" to "
                                              r"tokenizer_config\.json"):
        load_special_tokens(no_eos)
    rewrite(no_eos, "config.json", eos_token_id=2)  # config.json's eos, when nothing else names one
    assert load_special_tokens(no_eos).eos_ids == (2,)
