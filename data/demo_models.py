"""The offline demos' models: small random-init models saved as real Hugging Face checkpoints.

They are *presets that exercise the pipeline*, not pretrained models: the demo shows LoRA and the
heads learning on top of frozen random features, through exactly the loading path a real
checkpoint takes (config.json + model.safetensors + tokenizer.json, read by models/loading.py).

    <cache>/audio_tower/   config.json (model_type qwen2_audio, audio_config) + model.safetensors
                           with `audio_tower.*` keys, as in Qwen/Qwen2-Audio-7B-Instruct
    <cache>/text_tower/    config.json (model_type bert) + model.safetensors (BertModel keys)
                           + tokenizer.json and vocab.txt: a WordPiece trained on the demo captions
    <cache>/instructblip/  config.json (model_type instructblip) + model.safetensors with the hub
                           layout's keys + tokenizer.json (T5 side: "$A </s>") + qformer_tokenizer/
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import nn

from common.atomic import atomic_write, atomic_write_text, build_directory_once
from models.bert import BertConfig, BertModel
from models.instructblip import InstructBlip, InstructBlipConfig
from models.t5 import T5Config, T5ForConditionalGeneration
from models.qwen2_audio_encoder import Qwen2AudioEncoder, Qwen2AudioEncoderConfig

VERSION = 4  # bump when a preset below changes, so cached models are rebuilt
AUDIO_PRESET = dict(  # a Qwen2-Audio tower shrunk 10x in width and 16x in depth; 128 mel bins kept
    num_mel_bins=128, d_model=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=512,
    max_source_positions=1500
)
TEXT_PRESET = dict(  # a 2-layer BERT; 64 positions hold the longest demo caption with room to spare
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, max_position_embeddings=64,
    type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: pad_token_id 0
INIT_STD = 0.02  # BERT's initializer_range, used by transformers for both towers' Linear layers
DEMO_SEED = 0  # the demo models are fixed: a run's --seed is the training's randomness only


INSTRUCTBLIP_PRESET = dict(  # InstructBLIP-flan-t5-xl shrunk to a few CPU minutes; 64 px images, 8 queries
    num_query_tokens=8,
    vision_config=dict(model_type="instructblip_vision_model", hidden_size=64, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8, hidden_act="gelu",
                       layer_norm_eps=1e-6),
    qformer_config=dict(model_type="instructblip_qformer", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, cross_attention_frequency=1,
                        encoder_hidden_size=64, pad_token_id=0),
    text_config=dict(model_type="t5", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                     relative_attention_num_buckets=16, relative_attention_max_distance=64,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                     pad_token_id=0, eos_token_id=1, dropout_rate=0.1),
)
T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2


def init_like_transformers(module: nn.Module, seed: int):
    """transformers' _init_weights: normal(0, 0.02) weights, zero biases, unit LayerNorms (and T5's
    RMS norms). The positional table of the audio tower keeps its sinusoids (frozen in the real model);
    bare Parameters (class embedding, positions, query tokens) get normal(0, 0.02) too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("class_embedding", "position_embedding", "query_tokens")):
                param.normal_(0.0, INIT_STD, generator=generator)
            elif name.endswith("layer_norm.weight"):  # T5LayerNorm has no bias and no nn.LayerNorm type
                param.fill_(1.0)
        for name, m in module.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or (
                    isinstance(m, nn.Embedding) and name != "embed_positions"):
                m.weight.normal_(0.0, INIT_STD, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()


def init_t5_like_transformers(model: T5ForConditionalGeneration, seed: int):
    """transformers' T5 init (Mesh TF's): unit-variance embeddings and each projection scaled by its
    fan-in, so a random T5 already passes information from its input to its logits (a 0.02 init
    leaves it nearly input-blind, and nothing upstream could steer it)."""
    cfg, generator = model.config, torch.Generator().manual_seed(seed)
    std = {"shared": 1.0, "lm_head": 1.0, "wi": cfg.d_model**-0.5, "wi_0": cfg.d_model**-0.5, "wi_1": cfg.d_model**-0.5,
           "wo": cfg.d_ff**-0.5, "q": (cfg.d_model * cfg.d_kv) ** -0.5, "k": cfg.d_model**-0.5, "v": cfg.d_model**-0.5,
           "o": (cfg.num_heads * cfg.d_kv) ** -0.5, "relative_attention_bias": cfg.d_model**-0.5}
    with torch.no_grad():
        for name, param in model.named_parameters():
            module = name.rsplit(".", 2)[-2]  # the module a weight belongs to: q, wi_0, shared, ...
            if name.endswith("layer_norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std[module], generator=generator)


def save_checkpoint(directory: Path, config: dict, state: dict[str, torch.Tensor]):
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous() for key, value in state.items()}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")


def write_audio_tower(directory: Path, seed: int):
    """A Qwen2-Audio-format checkpoint holding only the audio tower (that is all we ever read)."""
    config = {"model_type": "qwen2_audio", "audio_config": {"model_type": "qwen2_audio_encoder", **AUDIO_PRESET}}
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG: the run's must not move
        encoder = Qwen2AudioEncoder(Qwen2AudioEncoderConfig.from_hf(config))
    init_like_transformers(encoder, seed)
    save_checkpoint(directory, config, {f"audio_tower.{k}": v for k, v in encoder.state_dict().items()})


def build_wordpiece(texts: list[str], special_tokens: list[str], unk: str, template: str) -> Tokenizer:
    """An uncased WordPiece over the demo's closed vocabulary (~70 words): the special tokens (the
    first is the pad token, id 0), then every word in sorted order. Built, not trained: the
    `tokenizers` trainers break frequency ties in a per-process hash order, so two runs would give
    two vocabularies and the demo could not be reproduced."""
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({word for text in texts
                    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))})
    vocab = {token: i for i, token in enumerate(special_tokens + [w for w in words if w not in special_tokens])}
    tok = Tokenizer(WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece(prefix="##")
    tok.add_special_tokens(special_tokens)  # so decode(skip_special_tokens=True) drops </s> and <pad>
    names = [t for t in ("[CLS]", "[SEP]", "</s>") if t in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in names])
    return tok


def write_text_tower(directory: Path, captions: list[str], seed: int):
    """A BertModel checkpoint (no prefix, with pooler, as sentence-transformers ship) + its tokenizer."""
    tok = build_wordpiece(captions, SPECIAL_TOKENS, "[UNK]", "[CLS] $A [SEP]")
    config = {"model_type": "bert", "vocab_size": tok.get_vocab_size(), **TEXT_PRESET}
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG: the run's must not move
        model = BertModel(BertConfig.from_hf(config))
    init_like_transformers(model, seed + 1)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "tokenizer.json", tok.to_str(pretty=True))
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    atomic_write_text(directory / "vocab.txt", "".join(f"{token}\n" for token, _ in vocab))
    save_checkpoint(directory, config, model.state_dict())


def write_instructblip(directory: Path, texts: list[str], seed: int):
    """A tiny InstructBLIP (ViT, Q-Former, flan-T5-style T5) in the hub layout, with both tokenizers."""
    qformer_tok = build_wordpiece(texts, SPECIAL_TOKENS, "[UNK]", "[CLS] $A [SEP]")
    t5_tok = build_wordpiece(texts, T5_SPECIAL_TOKENS, "<unk>", "$A </s>")
    preset = INSTRUCTBLIP_PRESET
    config = {"model_type": "instructblip", "num_query_tokens": preset["num_query_tokens"],
              "vision_config": preset["vision_config"],
              "qformer_config": {**preset["qformer_config"], "vocab_size": qformer_tok.get_vocab_size()},
              "text_config": {**preset["text_config"], "vocab_size": t5_tok.get_vocab_size()}}
    parsed = InstructBlipConfig.from_hf(config)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG: the run's must not move
        model = InstructBlip(parsed, T5ForConditionalGeneration(T5Config.from_hf(parsed.text_config)))
    init_like_transformers(model, seed + 2)
    init_t5_like_transformers(model.language_model, seed + 3)
    (directory / "qformer_tokenizer").mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "tokenizer.json", t5_tok.to_str(pretty=True))
    atomic_write_text(directory / "qformer_tokenizer" / "tokenizer.json", qformer_tok.to_str(pretty=True))
    save_checkpoint(directory, config, model.state_dict())


def build_once(cache_dir: Path, texts_file, seed: int, outputs: list[str], write) -> list[str]:
    """The folders named `outputs` under `cache_dir`, as write(folder, texts) makes them in `folder`,
    built once however many processes ask at once (common/atomic.py build_directory_once): reused while
    cache_dir/DONE.json says they were made from these texts, seed and VERSION and every file is whole,
    otherwise built again from scratch."""
    texts = Path(texts_file).read_text(encoding="utf-8")
    record = {"version": VERSION, "seed": seed, "texts_sha256": hashlib.sha256(texts.encode()).hexdigest()}
    lines = [line for line in texts.splitlines() if line.strip()]
    build_directory_once(cache_dir, record, lambda scratch: write(scratch, lines))
    return [str(Path(cache_dir) / name) for name in outputs]


def ensure_demo_instructblip(cache_dir, texts_file, seed: int = DEMO_SEED, verbose: bool = True) -> str:
    """The demo InstructBLIP directory under `cache_dir`, rebuilt when missing, damaged or stale.
    The model is fixed: `seed` is not a run's --seed."""

    def write(folder, texts):
        write_instructblip(folder / "instructblip", texts, seed)
        if verbose:
            print(f"demo InstructBLIP (random-init preset) written to {Path(cache_dir) / 'instructblip'}")

    return build_once(Path(cache_dir), texts_file, seed, ["instructblip"], write)[0]


def ensure_demo_models(cache_dir, captions_file, seed: int = DEMO_SEED, verbose: bool = True) -> dict[str, str]:
    """The demo towers under `cache_dir`, rebuilt when missing, damaged or made from other captions/seed.

    Returns {"audio_model": dir, "text_model": dir}. The towers are fixed: `seed` is not a run's --seed.
    """

    def write(folder, captions):
        write_audio_tower(folder / "audio_tower", seed)
        write_text_tower(folder / "text_tower", captions, seed)
        if verbose:
            print(f"demo towers (random-init presets) written to {cache_dir}")

    audio_model, text_model = build_once(Path(cache_dir), captions_file, seed, ["audio_tower", "text_tower"], write)
    return {"audio_model": audio_model, "text_model": text_model}
