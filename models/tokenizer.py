"""Text to token ids for the BERT text tower and the Q-Former, and for InstructBLIP's language
models (T5, LLaMA/Vicuna: their tokenizer.json as is, checked), with the `tokenizers` library only.

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

A tokenizer file that is missing or unusable is the checkpoint's fault, not ours: CheckpointNotFound
or CheckpointError (UserErrors, models/checkpoint.py), naming the file.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from models.checkpoint import CheckpointError, CheckpointNotFound

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
        raise CheckpointNotFound(f"no T5 tokenizer at {tokenizer_json}; InstructBLIP checkpoints ship it as tokenizer.json")
    tok = read_tokenizer_json(tokenizer_json)
    pad_id, eos_id = tok.token_to_id(T5_PAD), tok.token_to_id(T5_EOS)
    if pad_id is None or eos_id is None:
        raise CheckpointError(f"{tokenizer_json} lacks {T5_PAD} or {T5_EOS}: not a T5 tokenizer")
    if tok.encode("a").ids[-1:] != [eos_id]:
        raise CheckpointError(f"{tokenizer_json} does not append {T5_EOS} (its post-processor should be the template '$A {T5_EOS}')")
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=T5_PAD)
    return tok


def load_llama_tokenizer(tokenizer_json: Path | None, max_length: int = 2048, eos_token: str = LLAMA_EOS) -> Tokenizer:
    """A LLaMA-family tokenizer.json (Vicuna: SentencePiece BPE with byte fallback): it must put a
    BOS in front of every text and no eos after it, since the prompt is continued by the answer in
    the same sequence; answers get `eos_token` appended by the collate (data/instructblip.py).

    The BOS is whatever the post-processor adds: `<s>` in LLaMA, `</s>` in InstructBLIP-Vicuna (LAVIS
    made bos = eos = unk = `</s>` and added `[PAD]`; transformers' conversion kept that). Padding uses
    `[PAD]`, `<pad>` or `<unk>`, the first that exists: its id is never read, the mask hides it.

    Only tokenizer.json is read. A checkpoint that ships only the SentencePiece `tokenizer.model`
    gets an error saying how to write tokenizer.json once (building the BPE merges from the
    SentencePiece protobuf here would take a protobuf parser and its own parity tests)."""
    if tokenizer_json is None or not Path(tokenizer_json).is_file():
        raise CheckpointNotFound(
            f"no LLaMA tokenizer.json {f'at {tokenizer_json}' if tokenizer_json else 'in the checkpoint'}; if it ships "
            "only the SentencePiece tokenizer.model, write tokenizer.json once with python -c \"from transformers import "
            "AutoTokenizer; AutoTokenizer.from_pretrained('MODEL').save_pretrained('DIR')\" (MODEL: its directory or "
            "hub id) and copy DIR/tokenizer.json beside config.json")
    tokenizer_json = Path(tokenizer_json)
    tok = read_tokenizer_json(tokenizer_json)
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise CheckpointError(f"{tokenizer_json} has no {eos_token} token: not a LLaMA tokenizer")
    encoding = tok.encode("a")
    if not encoding.special_tokens_mask[:1] == [1]:
        raise CheckpointError(f"{tokenizer_json} adds no BOS in front of a text (its post-processor should be the template "
                         "'<s> $A'); a LLaMA prompt starts with one")
    if encoding.ids[-1] == eos_id:
        raise CheckpointError(f"{tokenizer_json} appends {eos_token} to every text; a decoder-only prompt must not end the "
                         "sequence before the answer (use the template '<s> $A')")
    pad = next((t for t in LLAMA_PADS if tok.token_to_id(t) is not None), eos_token)
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad)
    return tok


def wordpiece_from_vocab(vocab_txt: Path) -> Tokenizer:
    """transformers' BertTokenizer pipeline, built from vocab.txt and tokenizer_config.json."""
    config_path = vocab_txt.parent / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON ({error}); download it again") from None
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
