"""Text to token ids for the BERT text tower and the Q-Former, and for InstructBLIP's language
models (T5; any LLaMA-family decoder: Vicuna, Llama 3, SmolLM2, Qwen2), with the `tokenizers` library only.

WordPiece as used by BERT (Devlin et al. 2019; Wu et al. 2016, "Google's Neural Machine
Translation System"). A checkpoint ships either `tokenizer.json` (the whole `tokenizers`
pipeline, loaded as is) or, in older repositories, only `vocab.txt`. For the latter we build the
pipeline that transformers' `BertTokenizer` (v5; `BertTokenizerFast` in v4) builds from it:
BertNormalizer -> BertPreTokenizer -> WordPiece("##", "[UNK]") -> "[CLS] $A [SEP]".

Quirks:
- casing lives in `tokenizer_config.json` (`do_lower_case`, default True, which also strips
  accents unless `strip_accents` says otherwise), not in vocab.txt: an uncased vocabulary
  read without lowercasing turns every capitalised word into [UNK];
- a tokenizer.json may carry its own truncation and padding (some pad every text to a fixed
  length); we overwrite both, so a batch is padded to its longest text and cut at `max_length`
  tokens, [CLS] and [SEP] included, which must not exceed the model's max_position_embeddings.

A decoder-only language model's special tokens are not in tokenizer.json alone: `read_special_tokens`
reads bos/eos/pad and the chat template from tokenizer_config.json, special_tokens_map.json and
generation_config.json beside it, as transformers' AutoTokenizer and GenerationConfig do, into a
`SpecialTokens` that batches and generation use (docs/tokenizers-and-generation.md).

A tokenizer file that is missing or unusable is the checkpoint's fault, not ours: CheckpointNotFound
or CheckpointError (UserErrors, models/checkpoint.py), naming the file.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from models.checkpoint import CheckpointError, CheckpointNotFound, read_json_object

UNK, CLS, SEP, PAD, MASK = "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"
T5_PAD, T5_EOS = "<pad>", "</s>"
LLAMA_EOS, LLAMA_PADS = "</s>", ("[PAD]", "<pad>", "<unk>")
MAX_LENGTH = 512  # BERT's max_position_embeddings; pass the model's own value


def load_tokenizer_dir(model_dir: Path, max_length: int = MAX_LENGTH) -> Tokenizer:
    """The tokenizer of a checkpoint directory: its tokenizer.json, else its vocab.txt."""
    model_dir = Path(model_dir)
    return load_tokenizer_files(model_dir / "tokenizer.json", model_dir / "vocab.txt", max_length)


def read_tokenizer_json(path: Path) -> Tokenizer:
    """Tokenizer.from_file, with a damaged file named: tokenizers raises a bare Exception for it."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:
        raise CheckpointError(f"{path} is not a tokenizer.json the tokenizers library can read ({error}); "
                              "download it again") from None


def load_tokenizer_files(
    tokenizer_json: Path | None, vocab_txt: Path | None, max_length: int = MAX_LENGTH
) -> Tokenizer:
    """Load tokenizer.json when it exists, else build BERT's WordPiece tokenizer from vocab.txt
    (with `tokenizer_config.json` beside it for casing); a path that does not exist counts as
    absent. The result truncates to `max_length` and pads each batch to its longest text."""
    if tokenizer_json is not None and Path(tokenizer_json).is_file():
        tok = read_tokenizer_json(tokenizer_json)
        source = Path(tokenizer_json)
    elif vocab_txt is not None and Path(vocab_txt).is_file():
        tok = wordpiece_from_vocab(Path(vocab_txt))
        source = Path(vocab_txt)
    else:
        dirs = sorted({str(Path(p).parent) for p in (tokenizer_json, vocab_txt) if p is not None})
        raise CheckpointNotFound(
            f"no tokenizer.json or vocab.txt in {', '.join(dirs) or '(no path given)'}: "
            "a BERT checkpoint needs one of them; copy them from the model's hub repository"
        )
    pad_id = tok.token_to_id(PAD)
    if pad_id is None:
        raise CheckpointError(f"{source} has no {PAD} token, so a batch of texts cannot be padded")
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=PAD)  # no length: pad to the batch's longest
    return tok


def load_t5_tokenizer(tokenizer_json: Path, max_length: int = MAX_LENGTH) -> Tokenizer:
    """A T5 tokenizer.json (SentencePiece Unigram, as flan-t5 ships it): pad token `<pad>`, and
    every text must end in `</s>`: a decoder trained on answers without it never learns to stop."""
    tokenizer_json = Path(tokenizer_json)
    if not tokenizer_json.is_file():
        raise CheckpointNotFound(f"no T5 tokenizer at {tokenizer_json}; "
                                 "InstructBLIP checkpoints ship it as tokenizer.json")
    tok = read_tokenizer_json(tokenizer_json)
    pad_id, eos_id = tok.token_to_id(T5_PAD), tok.token_to_id(T5_EOS)
    if pad_id is None or eos_id is None:
        raise CheckpointError(f"{tokenizer_json} lacks {T5_PAD} or {T5_EOS}: not a T5 tokenizer")
    if tok.encode("a").ids[-1:] != [eos_id]:
        raise CheckpointError(f"{tokenizer_json} does not append {T5_EOS} "
                              f"(its post-processor should be the template '$A {T5_EOS}')")
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=T5_PAD)
    return tok


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids a decoder-only language model's batches and generation need, read from its checkpoint by
    `read_special_tokens` (a checkpoint directory or hub id: models/loading.py `load_special_tokens`)."""
    bos_id: int | None  # in front of every prompt; None: this model's prompts start with no BOS (Qwen2, SmolLM2)
    eos_ids: tuple[int, ...]  # generation stops at any of them; eos_ids[0], the tokenizer's eos, ends every answer
    pad_id: int  # fills padding; its value is never read (the mask hides it, labels are -100 there)
    chat_template: str | None = None  # the checkpoint's Jinja chat template, unrendered; None if it ships none

    @property
    def eos_id(self) -> int:
        """The id each training answer ends with, so that generation learns to stop."""
        return self.eos_ids[0]


def tokenizer_settings(directory: Path) -> dict:
    """tokenizer_config.json with special_tokens_map.json read into it as transformers reads them: a config saved
    before `added_tokens_decoder` existed takes the map's values over its own; a newer one keeps its own (the map
    then only fills a field it lacks, where transformers would use its tokenizer class's default)."""
    config = read_json_object(directory / "tokenizer_config.json")
    mapping = read_json_object(directory / "special_tokens_map.json")
    return {**mapping, **config} if "added_tokens_decoder" in config else {**config, **mapping}


def _token_content(value) -> str | None:
    """A special token as configs spell it: "<s>", an AddedToken dict {"content": "<s>", ...}, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value) -> list[int]:
    """generation_config.json's / config.json's eos_token_id: an int, a list of them, or null."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def template_specials(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer's post-processor writes before and after a text."""
    encoding = tok.encode("a")
    ids, mask = encoding.ids, encoding.special_tokens_mask
    lead = next((i for i, m in enumerate(mask) if not m), len(ids))
    tail = next((i for i, m in enumerate(reversed(mask)) if not m), 0)
    return ids[:lead], ids[len(ids) - tail:]


def read_special_tokens(tok: Tokenizer, directory: Path | None = None,
                        model_config: dict | None = None) -> SpecialTokens:
    """bos/eos/pad ids and the chat template of a decoder-only LM whose tokenizer.json (loaded: `tok`) lies in
    `directory`, from the files beside it, each optional, as transformers reads them:

    - BOS: what tokenizer.json's post-processor writes in front of a text: `<s>` (LLaMA 2), `</s>`
      (InstructBLIP-Vicuna, as LAVIS made it), `<|begin_of_text|>` (Llama 3), nothing (Qwen2, SmolLM2); but when
      tokenizer_config.json says add_bos_token or add_eos_token, those flags decide (with its bos_token), as
      transformers 4's LLaMA tokenizer rebuilt its post-processor from them. transformers 5 drops the flags
      whenever tokenizer.json exists; the released checkpoints' flags and templates agree, so both readings give
      the same ids there, and where a file disagrees the flag states how the model was trained. A tokenizer that
      appends a token to every text (add_eos_token, '$A </s>') is refused: the answer continues the prompt.
    - eos: tokenizer_config.json's eos_token ends the training answers; generation stops at it and at every id of
      generation_config.json's eos_token_id (else config.json's: `model_config`, the LM's config dict).
      Without an eos_token: the first of those ids, else `</s>` (a Vicuna tokenizer.json alone).
    - pad: pad_token (if tokenizer.json holds it: transformers would add a missing one as a new token), else
      tokenizer.json's own padding, generation_config.json's / config.json's pad_token_id, `[PAD]`, `<pad>` or
      `<unk>`, and last the eos. Its value is never read.
    - chat_template: chat_template.jinja, else tokenizer_config.json's (the "default" one of a list).

    directory None: from the tokenizer alone (its post-processor's BOS, `</s>`), which is InstructBLIP-Vicuna's."""
    settings = tokenizer_settings(Path(directory)) if directory is not None else {}
    generation = read_json_object(Path(directory) / "generation_config.json") if directory is not None else {}
    model_config = model_config or {}
    where = str(directory) if directory is not None else "the tokenizer"
    config_file = Path(directory) / "tokenizer_config.json" if directory is not None else "tokenizer_config.json"

    def named_id(field: str, required: bool = True) -> int | None:
        name = _token_content(settings.get(field))
        if name is None:
            return None
        token_id = tok.token_to_id(name)
        if token_id is None and required:
            raise CheckpointError(f"{config_file} names {field} {name!r}, which its tokenizer.json does not hold: the "
                                  "two files come from different checkpoints; download them again together")
        return token_id

    leading, trailing = template_specials(tok)
    if "add_bos_token" in settings or "add_eos_token" in settings:
        bos_id = named_id("bos_token") if settings.get("add_bos_token") else None
        if settings.get("add_bos_token") and bos_id is None:
            raise CheckpointError(f"{config_file} sets add_bos_token but names no bos_token; add \"bos_token\" (LLaMA: "
                                  "\"<s>\") or set add_bos_token to false")
        if settings.get("add_eos_token"):
            raise CheckpointError(f"{config_file} sets add_eos_token, which ends every text with the eos; a "
                                  "decoder-only prompt is continued by its answer in the same sequence: set "
                                  "add_eos_token to false")
    elif trailing or len(leading) > 1:
        file = Path(directory) / "tokenizer.json" if directory is not None else "the tokenizer"
        raise CheckpointError(f"{file}: its post-processor writes {len(leading)} token(s) before and {len(trailing)} "
                              "after every text; a decoder-only prompt takes at most a BOS in front and nothing after "
                              "(the answer continues it): use the template '<s> $A', or none")
    else:
        bos_id = leading[0] if leading else None

    listed = _id_list(generation["eos_token_id"] if "eos_token_id" in generation else model_config.get("eos_token_id"))
    eos_id = named_id("eos_token")
    if eos_id is None:
        eos_id = listed[0] if listed else tok.token_to_id(LLAMA_EOS)
    if eos_id is None:
        raise CheckpointError(f"{where}: no eos token: tokenizer_config.json names no eos_token, "
                              f"generation_config.json and config.json no eos_token_id, and tokenizer.json has no "
                              f"{LLAMA_EOS}; add the model's end token as \"eos_token\" to tokenizer_config.json")
    eos_ids = tuple(dict.fromkeys([eos_id, *listed]))

    pads = [named_id("pad_token", required=False), tok.padding["pad_id"] if tok.padding else None,
            *_id_list(generation.get("pad_token_id"))[:1], *_id_list(model_config.get("pad_token_id"))[:1],
            *(tok.token_to_id(t) for t in LLAMA_PADS), eos_id]
    pad_id = next(p for p in pads if p is not None)

    template = settings.get("chat_template")
    if isinstance(template, list):  # several named templates: the one transformers renders by default
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja = Path(directory) / "chat_template.jinja" if directory is not None else None
    if jinja is not None and jinja.is_file():  # newer saves write it apart; transformers prefers it to the config's
        template = jinja.read_text(encoding="utf-8")
    return SpecialTokens(bos_id, eos_ids, pad_id, template if isinstance(template, str) else None)


def load_llama_tokenizer(tokenizer_json: Path | None, max_length: int = 2048,
                         model_config: dict | None = None) -> Tokenizer:
    """A LLaMA-family tokenizer.json (Vicuna's SentencePiece BPE, Llama 3's and Qwen2's byte-level BPE, ...), read
    as is, with the special tokens of the files beside it (`read_special_tokens`; model_config: the LM's config dict).
    The prompt is continued by the answer in the same sequence, so the tokenizer writes at most a BOS in front of a
    text and nothing after; answers get the eos appended by the collate (data/instructblip.py).

    When tokenizer_config.json's add_bos_token decides a BOS the file's post-processor does not write (or writes
    one it should not), the post-processor becomes the template '<bos> $A' (or '$A'), as transformers 4's LLaMA
    tokenizer rebuilt it, so `encode(text).ids` are the model's prompt ids. Padding uses the special tokens' pad.

    A checkpoint that ships only the SentencePiece `tokenizer.model` gets an error saying how to write tokenizer.json
    once (building the BPE merges from the SentencePiece protobuf here would take a protobuf parser and its own
    parity tests)."""
    if tokenizer_json is None or not Path(tokenizer_json).is_file():
        raise CheckpointNotFound(
            f"no LLaMA tokenizer.json {f'at {tokenizer_json}' if tokenizer_json else 'in the checkpoint'}; if it ships "
            "only the SentencePiece tokenizer.model, write tokenizer.json once with python -c \"from transformers "
            "import AutoTokenizer; AutoTokenizer.from_pretrained('MODEL').save_pretrained('DIR')\" (MODEL: its "
            "directory or hub id) and copy DIR/tokenizer.json beside config.json")
    tokenizer_json = Path(tokenizer_json)
    tok = read_tokenizer_json(tokenizer_json)
    special = read_special_tokens(tok, tokenizer_json.parent, model_config)
    if template_specials(tok)[0] != ([] if special.bos_id is None else [special.bos_id]):
        bos = tok.id_to_token(special.bos_id) if special.bos_id is not None else None
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0" if bos else "$A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1" if bos else "$A:0 $B:1",
            special_tokens=[(bos, special.bos_id)] if bos else [])
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=special.pad_id, pad_token=tok.id_to_token(special.pad_id) or LLAMA_PADS[0])
    return tok


def wordpiece_from_vocab(vocab_txt: Path) -> Tokenizer:
    """transformers' BertTokenizer pipeline, built from vocab.txt and tokenizer_config.json."""
    config = read_json_object(vocab_txt.parent / "tokenizer_config.json")
    lowercase = config.get("do_lower_case", True)

    tok = Tokenizer(WordPiece.from_file(str(vocab_txt), unk_token=UNK, continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,  # drop control characters, map all whitespace to " "
        handle_chinese_chars=config.get("tokenize_chinese_chars", True),  # each CJK character is a word
        strip_accents=config.get("strip_accents"),  # None: strip exactly when lowercasing
        lowercase=lowercase,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on whitespace and punctuation
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = {token: tok.token_to_id(token) for token in (CLS, SEP)}
    missing = [token for token, id_ in specials.items() if id_ is None]
    if missing:
        raise CheckpointError(f"{vocab_txt} lacks {missing}: not a BERT vocabulary")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",  # the second segment gets token type 1
        special_tokens=list(specials.items()),
    )
    # As transformers does: a literal "[MASK]" in a text stays one token instead of "[", "mask", "]".
    tok.add_special_tokens([t for t in (PAD, UNK, CLS, SEP, MASK) if tok.token_to_id(t) is not None])
    return tok


def tokenize(tok: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of texts -> input_ids (B, L) long and attention_mask (B, L) long (1 = real token)."""
    if isinstance(texts, str) or not texts:
        raise ValueError(f"tokenize takes a non-empty list of texts, got {texts!r:.80}")
    if tok.padding is None:
        raise ValueError(
            "this tokenizer does not pad, so texts of different lengths cannot form a batch; "
            "load it with load_tokenizer_files"
        )
    encodings = tok.encode_batch(texts)
    input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)  # (B, L)
    attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)  # (B, L)
    return input_ids, attention_mask
