"""Build a tower from a checkpoint directory or hub id: config -> meta module -> strict load.

    load_audio_encoder("Qwen/Qwen2-Audio-7B-Instruct")   # only the shards holding audio_tower.*
    load_audio_encoder("openai/whisper-small")           # model.encoder.* onto the same module
    load_text_encoder("sentence-transformers/all-MiniLM-L6-v2")
    load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    load_special_tokens("Qwen/Qwen2-Audio-7B-Instruct")  # a decoder-only LM's bos, eos ids and pad

Each loader reads config.json, picks the key prefix the checkpoint uses, builds the module on the
meta device (no memory), and adopts the checkpoint's tensors with a strict, shape-checked load
(models/checkpoint.py). Nothing else in the checkpoint is read: a 7B Qwen2-Audio's language model
is never downloaded, let alone materialised. A checkpoint of the wrong kind, or without a
tokenizer, is a CheckpointError / CheckpointNotFound (a UserError), named with its source.
"""

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer

from models.bert import BertConfig, BertModel, bert_prefix, has_pooler
from models.checkpoint import Checkpoint, CheckpointError, CheckpointNotFound
from models.shard_loading import Quantize, load_weights
from models.qwen2_audio_encoder import Qwen2AudioEncoder, Qwen2AudioEncoderConfig
from models.tokenizer import (SpecialTokens, load_llama_tokenizer, load_t5_tokenizer, load_tokenizer_files,
                              read_special_tokens, read_tokenizer_json)

# Where each kind of checkpoint keeps the audio encoder, most common layout first.
AUDIO_PREFIXES = {
    "qwen2_audio": ("audio_tower.", "model.audio_tower."),  # hub layout; transformers 5 in memory
    "whisper": ("model.encoder.", "encoder."),  # WhisperForConditionalGeneration; WhisperModel
    "qwen2_audio_encoder": ("", "audio_tower."),  # a standalone encoder save
}
# Beside a decoder-only LM's tokenizer.json, each optional: where its bos/eos/pad and chat template are written
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                       "chat_template.jinja")
# Written by transformers before 4.31 (an arange buffer, not a weight); safe to drop.
LEGACY_BERT_KEYS = ("embeddings.position_ids",)


def audio_tower_prefix(checkpoint: Checkpoint) -> str:
    """The key prefix of the audio encoder in this checkpoint, e.g. 'audio_tower.'."""
    model_type = checkpoint.config.get("model_type")
    if model_type not in AUDIO_PREFIXES:
        raise CheckpointError(
            f"{checkpoint.source}: config.json has model_type {model_type!r}; an audio tower loads from "
            f"{', '.join(sorted(AUDIO_PREFIXES))} checkpoints"
        )
    for prefix in AUDIO_PREFIXES[model_type]:
        if f"{prefix}conv1.weight" in checkpoint.weight_map:
            return prefix
    tried = ", ".join(f"'{p}conv1.weight'" for p in AUDIO_PREFIXES[model_type])
    raise CheckpointError(
        f"{checkpoint.source} is a {model_type} checkpoint but holds none of {tried}; "
        f"its top-level prefixes are: {', '.join(checkpoint.top_level_prefixes())}"
    )


def config_from_hf(checkpoint: Checkpoint, config_class):
    """`config_class.from_hf(config.json)`; what it refuses (a model_type or a field it does not read)
    is the checkpoint's, so it is a CheckpointError naming the checkpoint."""
    try:
        return config_class.from_hf(checkpoint.config)
    except ValueError as error:
        raise CheckpointError(f"{checkpoint.source}: {error}") from None


def load_audio_encoder(path_or_hub_id: str | Path, dtype: str | torch.dtype = torch.float32,
                       revision: str | None = None, quantize: Quantize | None = None) -> Qwen2AudioEncoder:
    """The Qwen2-Audio audio tower (or a Whisper encoder mapped onto it), weights loaded, in eval mode; with
    `quantize`, its Linear layers then held in NF4 (models/shard_loading.py)."""
    checkpoint = Checkpoint.open(path_or_hub_id, revision=revision)
    config = config_from_hf(checkpoint, Qwen2AudioEncoderConfig)
    prefix = audio_tower_prefix(checkpoint)
    with torch.device("meta"):
        encoder = Qwen2AudioEncoder(config)
    return load_weights(encoder, checkpoint, prefix, dtype, quantize).eval()


def load_text_encoder(path_or_hub_id: str | Path, dtype: str | torch.dtype = torch.float32, revision: str | None = None,
                      quantize: Quantize | None = None) -> BertModel:
    """A BERT-family text encoder (BERT, MiniLM, ...), with its pooler when the checkpoint has one; with
    `quantize`, its Linear layers then held in NF4."""
    checkpoint = Checkpoint.open(path_or_hub_id, revision=revision)
    config = config_from_hf(checkpoint, BertConfig)
    try:
        prefix = bert_prefix(checkpoint.weight_map)
    except ValueError as error:  # the keys hold no BERT encoder
        raise CheckpointError(f"{checkpoint.source}: {error}") from None
    with torch.device("meta"):
        encoder = BertModel(config, with_pooler=has_pooler(checkpoint.weight_map, prefix))

    def skip(key: str) -> bool:  # a bare BertModel save: heads of other architectures would carry a prefix
        return key in LEGACY_BERT_KEYS or (prefix == "" and key.startswith(("cls.", "classifier.")))

    return load_weights(encoder, checkpoint, prefix, dtype, quantize, skip).eval()



def load_tokenizer(path_or_hub_id: str | Path, revision: str | None = None) -> Tokenizer:
    """The checkpoint's tokenizer (tokenizer.json, else vocab.txt), truncating at its max positions
    and padding each batch to its longest text. No weights are read."""
    checkpoint = Checkpoint.open(path_or_hub_id, revision=revision, weights=False)
    checkpoint.file("tokenizer_config.json", required=False)  # casing for vocab.txt; lands beside it
    tokenizer_json = checkpoint.file("tokenizer.json", required=False)
    vocab_txt = None if tokenizer_json else checkpoint.file("vocab.txt", required=False)
    if tokenizer_json is None and vocab_txt is None:
        if "tokenizer.json" in checkpoint.not_cached:  # offline, it may still be on the hub: say how to get it
            raise checkpoint.not_cached["tokenizer.json"]
        raise CheckpointNotFound(f"{checkpoint.source} has neither tokenizer.json nor vocab.txt: it ships no tokenizer "
                                 "we can read")
    max_length = int(checkpoint.config.get("max_position_embeddings", 512))
    return load_tokenizer_files(tokenizer_json, vocab_txt, max_length=max_length)


def load_instructblip_tokenizers(path_or_hub_id: str | Path,
                                 revision: str | None = None) -> tuple[Tokenizer, Tokenizer]:
    """(Q-Former tokenizer, language-model tokenizer) of an InstructBLIP checkpoint: `qformer_tokenizer/`
    (a BERT WordPiece for the instruction) and the root `tokenizer.json` for the prompt and answers:
    T5's (flan-t5, appends </s>) or a LLaMA-family one (Vicuna: a </s> BOS in front), as `text_config` says;
    the latter's special tokens: `load_special_tokens`."""
    checkpoint = Checkpoint.open(path_or_hub_id, revision=revision, weights=False)
    checkpoint.file("qformer_tokenizer/tokenizer_config.json", required=False)  # casing for a vocab.txt
    qformer_json = checkpoint.file("qformer_tokenizer/tokenizer.json", required=False)
    qformer_vocab = None if qformer_json else checkpoint.file("qformer_tokenizer/vocab.txt", required=False)
    if qformer_json is None and qformer_vocab is None:
        if "qformer_tokenizer/tokenizer.json" in checkpoint.not_cached:
            raise checkpoint.not_cached["qformer_tokenizer/tokenizer.json"]
        raise CheckpointNotFound(f"{checkpoint.source} has no qformer_tokenizer/tokenizer.json or "
                                 "qformer_tokenizer/vocab.txt")
    qformer_config = checkpoint.config.get("qformer_config") or {}
    qformer = load_tokenizer_files(qformer_json, qformer_vocab,
                                   max_length=int(qformer_config.get("max_position_embeddings", 512)))
    text_config = checkpoint.config.get("text_config") or {}
    if text_config.get("model_type") == "llama":  # InstructBLIP-Vicuna, or another LLaMA-family decoder
        tokenizer_json = decoder_tokenizer_files(checkpoint)
        max_length = int(text_config.get("max_position_embeddings", 2048))
        language = load_llama_tokenizer(tokenizer_json, max_length, text_config)
    else:
        language = load_t5_tokenizer(checkpoint.file("tokenizer.json"))
    return qformer, language


def decoder_tokenizer_files(checkpoint: Checkpoint) -> Path | None:
    """Local path of a decoder-only LM's tokenizer.json, fetched with the files that name its special tokens
    (SPECIAL_TOKEN_FILES, each optional) so that they lie beside it; None if the checkpoint has no tokenizer.json
    (models/tokenizer.py `load_llama_tokenizer` then says how to write one)."""
    for name in SPECIAL_TOKEN_FILES:
        checkpoint.file(name, required=False)
    tokenizer_json = checkpoint.file("tokenizer.json", required=False)
    if tokenizer_json is None and "tokenizer.json" in checkpoint.not_cached:
        raise checkpoint.not_cached["tokenizer.json"]
    return tokenizer_json


@functools.lru_cache(maxsize=8)  # read once per process: every evaluation of a run asks again
def load_special_tokens(path_or_hub_id: str | Path, revision: str | None = None) -> SpecialTokens:
    """bos/eos/pad ids and chat template of a decoder-only language model's checkpoint (LLaMA, Qwen2, SmolLM2,
    InstructBLIP-Vicuna, Qwen2-Audio), read from its tokenizer.json, tokenizer_config.json, special_tokens_map.json
    and generation_config.json as transformers reads them (models/tokenizer.py `read_special_tokens`). No weights
    are read. Batches end each answer with `.eos_id` and put `.bos_id` (if not None) in front of each prompt;
    generation stops at any of `.eos_ids`: model.generate(..., eos_token_id=special.eos_ids)."""
    checkpoint = Checkpoint.open(path_or_hub_id, revision=revision, weights=False)
    tokenizer_json = decoder_tokenizer_files(checkpoint)
    if tokenizer_json is None:
        raise CheckpointNotFound(f"{checkpoint.source} has no tokenizer.json: a decoder-only language model's special "
                                 "tokens are read from it and the files beside it")
    language_config = checkpoint.config.get("text_config") or checkpoint.config  # a composite model's LM, or the LM
    return read_special_tokens(read_tokenizer_json(tokenizer_json), tokenizer_json.parent, language_config)
