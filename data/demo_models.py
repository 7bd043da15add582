"""The offline demo's towers: small random-init models saved as real Hugging Face checkpoints.

They are *presets that exercise the pipeline*, not pretrained models: the demo shows LoRA and the
heads learning on top of frozen random features, through exactly the loading path a real
checkpoint takes (config.json + model.safetensors + tokenizer.json, read by models/loading.py).

    <cache>/audio_tower/   config.json (model_type qwen2_audio, audio_config) + model.safetensors
                           with `audio_tower.*` keys, as in Qwen/Qwen2-Audio-7B-Instruct
    <cache>/text_tower/    config.json (model_type bert) + model.safetensors (BertModel keys)
                           + tokenizer.json and vocab.txt: a WordPiece trained on the demo captions
"""

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer
from torch import nn

from lora.atomic import atomic_write, atomic_write_text
from models.bert import BertConfig, BertModel
from models.qwen2_audio_encoder import Qwen2AudioEncoder, Qwen2AudioEncoderConfig

VERSION = 1  # bump when a preset below changes, so cached towers are rebuilt
AUDIO_PRESET = dict(  # a Qwen2-Audio tower shrunk 10x in width and 16x in depth; 128 mel bins kept
    num_mel_bins=128, d_model=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=512, max_source_positions=1500
)
TEXT_PRESET = dict(  # a 2-layer BERT; 64 positions hold the longest demo caption with room to spare
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, max_position_embeddings=64,
    type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: pad_token_id 0
INIT_STD = 0.02  # BERT's initializer_range, used by transformers for both towers' Linear layers


def init_like_transformers(module: nn.Module, seed: int):
    """transformers' _init_weights: normal(0, 0.02) weights, zero biases, unit LayerNorms.
    The positional table of the audio tower keeps its sinusoids (frozen in the real model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)) or (isinstance(m, nn.Embedding) and name != "embed_positions"):
                m.weight.normal_(0.0, INIT_STD, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()


def save_checkpoint(directory: Path, config: dict, state: dict[str, torch.Tensor]):
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous() for key, value in state.items()}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")


def write_audio_tower(directory: Path, seed: int):
    """A Qwen2-Audio-format checkpoint holding only the audio tower (that is all we ever read)."""
    config = {"model_type": "qwen2_audio", "audio_config": {"model_type": "qwen2_audio_encoder", **AUDIO_PRESET}}
    encoder = Qwen2AudioEncoder(Qwen2AudioEncoderConfig.from_hf(config))
    init_like_transformers(encoder, seed)
    save_checkpoint(directory, config, {f"audio_tower.{k}": v for k, v in encoder.state_dict().items()})


def train_tokenizer(captions: list[str]) -> Tokenizer:
    """An uncased BERT WordPiece over the demo's captions (a closed vocabulary of ~70 words)."""
    tok = Tokenizer(WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(captions, WordPieceTrainer(vocab_size=1000, special_tokens=SPECIAL_TOKENS, min_frequency=1, show_progress=False))
    ids = {token: tok.token_to_id(token) for token in ("[CLS]", "[SEP]")}
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=list(ids.items()))
    return tok


def write_text_tower(directory: Path, captions: list[str], seed: int):
    """A BertModel checkpoint (no prefix, with pooler, as sentence-transformers ship) + its tokenizer."""
    tok = train_tokenizer(captions)
    config = {"model_type": "bert", "vocab_size": tok.get_vocab_size(), **TEXT_PRESET}
    model = BertModel(BertConfig.from_hf(config))
    init_like_transformers(model, seed + 1)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "tokenizer.json", tok.to_str(pretty=True))
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    atomic_write_text(directory / "vocab.txt", "".join(f"{token}\n" for token, _ in vocab))
    save_checkpoint(directory, config, model.state_dict())


def ensure_demo_models(cache_dir, captions_file, seed: int = 0, verbose: bool = True) -> dict[str, str]:
    """The demo towers under `cache_dir`, rebuilt when missing or made from other captions/seed.

    Returns {"audio_model": dir, "text_model": dir}. A DONE.json written last marks a complete set.
    """
    cache_dir = Path(cache_dir)
    captions_text = Path(captions_file).read_text(encoding="utf-8")
    record = {"version": VERSION, "seed": seed, "captions_sha256": hashlib.sha256(captions_text.encode()).hexdigest()}
    done = cache_dir / "DONE.json"
    paths = {"audio_model": str(cache_dir / "audio_tower"), "text_model": str(cache_dir / "text_tower")}
    try:
        if json.loads(done.read_text()) == record:
            return paths
    except (OSError, json.JSONDecodeError):
        pass
    done.unlink(missing_ok=True)
    for path in paths.values():
        shutil.rmtree(path, ignore_errors=True)
    captions = [line for line in captions_text.splitlines() if line.strip()]
    write_audio_tower(Path(paths["audio_model"]), seed)
    write_text_tower(Path(paths["text_model"]), captions, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(done, json.dumps(record, indent=2) + "\n")
    if verbose:
        print(f"demo towers (random-init presets) written to {cache_dir}")
    return paths
