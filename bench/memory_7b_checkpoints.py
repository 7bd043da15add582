"""The checkpoints bench/memory_7b.py measures: the released configs of Qwen/Qwen2-Audio-7B-Instruct and
Salesforce/instructblip-vicuna-7b (and `shrink`, their --tiny form), the benchmark's fixed texts, and the
streaming writer of random-init checkpoints (safetensors shards, index, config.json, word-level tokenizers)
that the toolkit's loaders and transformers' both read. See bench/memory_7b.py's docstring for the layout.
"""

import copy
import hashlib
import json
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import torch

VERSION = 1  # bump when the written checkpoints change, so old ones are rewritten
SHARD_BYTES = 4 * 10**9  # decimal GB, as save_pretrained's max_shard_size counts
TINY_SHARD_BYTES = 8 * 10**6  # --tiny: still several shards, so the index and the prefix filter are exercised
INIT_STD = 0.02  # Qwen2's and LLaMA's initializer_range
PROGRESS = "[progress] "  # a child's stderr lines the parent shows as they come

# Qwen/Qwen2-Audio-7B-Instruct's config.json as released (transformers 4.45.0.dev0): sparse, the rest is the
# defaults of Qwen2AudioEncoderConfig (Whisper-large-v3's encoder: 128 mels, d_model 1280, 32 layers, 20 heads,
# ffn 5120, 1500 positions) and Qwen2Config (hidden 4096, 32 layers, 32 heads, 32 KV heads). No copy of the
# file itself was at hand: this text_config is the one public fixtures replicating the pinned file agree on
# field for field (`QWEN2_AUDIO_SPARSE_CONFIG` in config-mirroring test suites: "its text_config omits most
# geometry; the upstream defaults apply"); its audio_config names only the model_type (some fixtures spell the
# encoder's defaults out, the same values). `write_checkpoint` checks that both loaders expand it to 7B shapes.
QWEN2_AUDIO_7B_INSTRUCT = {
    "architectures": ["Qwen2AudioForConditionalGeneration"],
    "audio_config": {"model_type": "qwen2_audio_encoder"},
    "audio_token_index": 151646,
    "model_type": "qwen2_audio",
    "text_config": {"bos_token_id": 151643, "eos_token_id": 151645, "intermediate_size": 11008,
                    "max_position_embeddings": 8192, "model_type": "qwen2", "rms_norm_eps": 1e-05, "rope_theta": 10000,
                    "sliding_window": 32768, "torch_dtype": "bfloat16", "use_mrope": False, "vocab_size": 156032},
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
}
# Salesforce/instructblip-vicuna-7b's config.json: transformers' convert_instructblip_original_to_pytorch.py
# (huggingface/transformers, src/transformers/models/instructblip/) builds it as InstructBlipVisionConfig(
# image_size=224), InstructBlipQFormerConfig(vocab_size=30523) (BERT's 30522 + "[DEC]") and
# LlamaConfig.from_pretrained("decapoda-research/llama-7b-hf", vocab_size=32001) (LLaMA + "[PAD]"); the
# fields below are those classes' values at the release (transformers 4.31), decapoda's bos 0 / eos 1 / pad -1
# quirk included. The generic PretrainedConfig fields of the 4.31 dump (generation defaults) are left out; the
# released weights were fp32, these bf16.
INSTRUCTBLIP_VICUNA_7B = {
    "architectures": ["InstructBlipForConditionalGeneration"],
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "model_type": "instructblip",
    "num_query_tokens": 32,
    "qformer_config": {"model_type": "instructblip_qformer", "vocab_size": 30523, "hidden_size": 768,
                       "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                       "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                       "max_position_embeddings": 512, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
                       "pad_token_id": 0, "position_embedding_type": "absolute", "cross_attention_frequency": 2,
                       "encoder_hidden_size": 1408},
    "text_config": {"model_type": "llama", "architectures": ["LLaMAForCausalLM"], "vocab_size": 32001,
                    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
                    "max_sequence_length": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "pretraining_tp": 1,
                    "rope_scaling": None, "tie_word_embeddings": False, "use_cache": True, "bos_token_id": 0,
                    "eos_token_id": 1, "pad_token_id": -1, "torch_dtype": "float16"},
    "torch_dtype": "bfloat16",
    "transformers_version": "4.31.0.dev0",
    "use_decoder_only_language_model": True,
    "vision_config": {"model_type": "instructblip_vision_model", "hidden_size": 1408, "intermediate_size": 6144,
                      "num_hidden_layers": 39, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                      "hidden_act": "gelu", "layer_norm_eps": 1e-06, "attention_dropout": 0.0,
                      "initializer_range": 1e-10, "qkv_bias": True},
}
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|AUDIO|>": 151646,
                    "<|audio_bos|>": 151647, "<|audio_eos|>": 151648}  # Qwen2's three, then Qwen2-Audio's
VICUNA_SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "[PAD]": 32000}
CAPTIONS = ["a dog barks twice near a busy road", "rain falls on a metal roof at night"]
QA_PROMPT = "What can you hear in this recording ? Describe it in detail ."
VQA_PROMPT = "What is unusual about this image ? Describe it in detail ."
ANSWER_WORDS = ("a dog barks near a busy road while rain falls on a metal roof and a car passes by slowly then "
                "stops and the door opens").split()
ANSWER = " ".join((ANSWER_WORDS * 2)[:32])  # 32 tokens with the word-level tokenizers below


def shrink(config: dict) -> dict:
    """--tiny: the released config with small widths and two layers; vocabularies, special ids, 128 mels,
    1500 audio positions, 224 px images and 32 queries kept, so every id and input shape is the real one."""
    c = copy.deepcopy(config)
    if c["model_type"] == "qwen2_audio":
        c["audio_config"].update(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256)
        c["text_config"].update(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4)
    else:
        c["vision_config"].update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        c["qformer_config"].update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   encoder_hidden_size=64)
        c["text_config"].update(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4)
    return c

# ---- writing the checkpoints: streaming, one tensor chunk at a time -----------------------------


def parameter_layout(config: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, in the order save_pretrained writes them, from our ports built on the meta
    device (their names are the checkpoint's keys; no memory is used)."""
    from models.instructblip import InstructBlip, InstructBlipConfig
    from models.llama import LlamaConfig, LlamaForCausalLM
    from models.qwen2_audio import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    with torch.device("meta"):
        if config["model_type"] == "qwen2_audio":
            parsed = Qwen2AudioConfig.from_hf(config)
            language_model = LlamaForCausalLM(LlamaConfig.from_hf(parsed.text_config))
            model = Qwen2AudioForConditionalGeneration(parsed, language_model)
        else:
            parsed = InstructBlipConfig.from_hf(config)
            model = InstructBlip(parsed, LlamaForCausalLM(LlamaConfig.from_hf(parsed.text_config)))
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def shard_plan(layout: dict, shard_bytes: int) -> list[list[str]]:
    """Keys packed greedily in order into shards of at most shard_bytes (bf16), as save_pretrained does."""
    shards, size = [[]], 0
    for key, shape in layout.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(key)
        size += nbytes
    return shards


def is_norm_weight(key: str) -> bool:
    module = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else ""
    return key.endswith(".weight") and "norm" in module.lower()  # layer_norm1, layernorm, LayerNorm, norm, ...


def tensor_chunks(key: str, shape: tuple, seed: int, chunk: int = 1 << 24):
    """The values of one tensor, in bf16 pieces of at most `chunk` elements: ones for norm weights, zeros for
    biases, else normal(0, 0.02) from a generator seeded by (seed, key), so a key's values never depend on
    the shard layout."""
    n = math.prod(shape)
    if len(shape) == 1:
        yield torch.full((n,), 1.0 if is_norm_weight(key) else 0.0, dtype=torch.bfloat16)
        return
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    for start in range(0, n, chunk):
        yield torch.empty(min(chunk, n - start)).normal_(0.0, INIT_STD, generator=generator).to(torch.bfloat16)


def write_safetensors(path: Path, layout: dict, keys: list[str], seed: int) -> int:
    """A safetensors file written as a stream: 8-byte header length, the JSON header (offsets known from the
    shapes), then each tensor's bytes as they are generated. Returns the bytes of tensor data."""
    header, offset = {}, 0
    for key in keys:
        nbytes = 2 * math.prod(layout[key])
        header[key] = {"dtype": "BF16", "shape": list(layout[key]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        file.write(struct.pack("<Q", len(blob)) + blob)
        for key in keys:
            for piece in tensor_chunks(key, layout[key], seed):
                file.write(piece.view(torch.int16).numpy())  # bf16 has no numpy dtype: its bits as int16
        file.flush()
        os.fsync(file.fileno())
    partial.rename(path)
    return offset


def word_level(words: list[str], special_ids: dict[str, int], unk: str, template: str | None = None):
    """A word-level tokenizer.json: each word one token (ids from 0, skipping the special ids), the special
    tokens at their released ids, whitespace/punctuation pre-tokenizer. Enough for the loaders' checks and
    for inputs of known length; a real BPE would only change which ids the same lengths hold."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    taken, vocab, next_id = set(special_ids.values()), dict(special_ids), 0
    for word in sorted(set(words) | {unk}):
        if word in vocab:
            continue
        while next_id in taken:
            next_id += 1
        vocab[word], next_id = next_id, next_id + 1
    tok = Tokenizer(WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(special_ids))
    if template:
        names = [t for t in special_ids if t in template.split()]
        tok.post_processor = processors.TemplateProcessing(single=template,
                                                           special_tokens=[(t, vocab[t]) for t in names])
    return tok


def split_words(texts: list[str]) -> list[str]:
    from tokenizers import pre_tokenizers

    return [word for text in texts for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def write_tokenizers(directory: Path, config: dict):
    from data.demo_models import SPECIAL_TOKENS, build_wordpiece
    from models.qwen2_audio import CHAT_TOKENS, chat_prompt

    if config["model_type"] == "qwen2_audio":
        template = chat_prompt(QA_PROMPT)
        for token in CHAT_TOKENS:
            template = template.replace(token, " ")
        tok = word_level(split_words([template, ANSWER]), QWEN_SPECIAL_IDS, "[UNK]")
        (directory / "tokenizer.json").write_text(tok.to_str())
        return
    # InstructBLIP-Vicuna: LAVIS made </s> the BOS (and eos and unk); the Q-Former reads BERT WordPiece
    tok = word_level(split_words([VQA_PROMPT, ANSWER]), VICUNA_SPECIAL_IDS, "<unk>", template="</s> $A")
    (directory / "tokenizer.json").write_text(tok.to_str())
    (directory / "qformer_tokenizer").mkdir(exist_ok=True)
    qformer = build_wordpiece([VQA_PROMPT], SPECIAL_TOKENS, "[UNK]", "[CLS] $A [SEP]")
    (directory / "qformer_tokenizer" / "tokenizer.json").write_text(qformer.to_str())


def check_config_expands(config: dict, layout: dict):
    """The sparse released config must give the 7B shapes in our loader and in transformers alike."""
    import transformers

    if config["model_type"] == "qwen2_audio":
        hf = transformers.Qwen2AudioConfig(**{k: v for k, v in config.items() if k != "architectures"})
        tower, lm = hf.audio_config, hf.text_config
        expected = {"audio_tower.conv1.weight": (tower.d_model, tower.num_mel_bins, 3),
                    f"audio_tower.layers.{tower.encoder_layers - 1}.fc1.weight": (tower.encoder_ffn_dim, tower.d_model),
                    "language_model.model.embed_tokens.weight": (lm.vocab_size, lm.hidden_size),
                    f"language_model.model.layers.{lm.num_hidden_layers - 1}.mlp.up_proj.weight":
                        (lm.intermediate_size, lm.hidden_size)}
    else:
        hf = transformers.InstructBlipConfig(**{k: v for k, v in config.items() if k != "architectures"})
        vision, lm = hf.vision_config, hf.text_config
        expected = {f"vision_model.encoder.layers.{vision.num_hidden_layers - 1}.mlp.fc1.weight":
                        (vision.intermediate_size, vision.hidden_size),
                    "language_model.model.embed_tokens.weight": (lm.vocab_size, lm.hidden_size),
                    "query_tokens": (1, hf.num_query_tokens, hf.qformer_config.hidden_size)}
    wrong = {key: (layout.get(key), shape) for key, shape in expected.items() if layout.get(key) != tuple(shape)}
    if wrong:
        raise RuntimeError(f"our port and transformers read the config differently (ours, transformers): {wrong}")


def write_checkpoint(directory: Path, config: dict, seed: int, shard_bytes: int) -> dict:
    """config.json, tokenizer(s), the shards, model.safetensors.index.json; the caller writes DONE.json."""
    layout = parameter_layout(config)
    check_config_expands(config, layout)
    shards = shard_plan(layout, shard_bytes)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizers(directory, config)
    start, weight_map, total = time.perf_counter(), {}, 0
    for k, keys in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(directory / name, layout, keys, seed)
        weight_map |= dict.fromkeys(keys, name)
        print(f"{PROGRESS}{directory.name}/{name}: {len(keys)} tensors, {total / 1e9:.2f} GB so far, "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    tower_shards = sorted({weight_map[k] for k in layout if k.startswith(("audio_tower.", "qformer."))})
    return dict(bytes=total, shards=len(shards), seconds=time.perf_counter() - start, params=sum(
        math.prod(s) for s in layout.values()), tower_shards=tower_shards)


def checkpoint_record(kind: str, tiny: bool, seed: int) -> dict:
    """What DONE.json must hold for a folder to be reused: the config and layout inputs, hashed."""
    if kind == "bert":
        spec = {"captions": CAPTIONS}
    else:
        config = QWEN2_AUDIO_7B_INSTRUCT if kind == "qwen2-audio" else INSTRUCTBLIP_VICUNA_7B
        spec = {"config": shrink(config) if tiny else config, "shard_bytes": TINY_SHARD_BYTES if tiny else SHARD_BYTES,
                "texts": [QA_PROMPT, VQA_PROMPT, ANSWER]}
    spec |= {"version": VERSION, "seed": seed, "kind": kind}
    return {"kind": kind, "config_hash": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()}


def write_main(kind: str, directory: Path, tiny: bool, seed: int) -> dict:
    """The --write entry: one checkpoint folder, from scratch (in a process of its own, so the parent stays small)."""
    if kind == "bert":
        from data.demo_models import write_text_tower

        start = time.perf_counter()
        write_text_tower(directory, CAPTIONS, seed)
        size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        return dict(bytes=size, shards=1, seconds=time.perf_counter() - start, params=size // 4, tower_shards=[])
    config = QWEN2_AUDIO_7B_INSTRUCT if kind == "qwen2-audio" else INSTRUCTBLIP_VICUNA_7B
    shard_bytes = TINY_SHARD_BYTES if tiny else SHARD_BYTES
    return write_checkpoint(directory, shrink(config) if tiny else config, seed, shard_bytes)


def expected_bytes(kind: str, tiny: bool) -> int:
    if kind == "bert":
        return 10**7
    config = QWEN2_AUDIO_7B_INSTRUCT if kind == "qwen2-audio" else INSTRUCTBLIP_VICUNA_7B
    return sum(2 * math.prod(shape) for shape in parameter_layout(shrink(config) if tiny else config).values())

