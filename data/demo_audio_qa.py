"""The audio-qa demo: questions about synthetic sounds, and a tiny random-init Qwen2-Audio to tune.

With no --model and no --train-data, `train.py --task audio-qa` calls `ensure_demo_audio_qa(cache_dir)`:

    <cache>/sounds/    audio/*.wav (16 kHz mono, one sound event each: tones, a chirp, a noise burst
                       or clicks, made by data/demo_sounds.py), train.jsonl and eval.jsonl with lines
                       {"audio", "prompt", "answer"}: "How many tones do you hear?" -> "three",
                       "Does the pitch rise or fall?" -> "rises", "Describe the sound briefly." ->
                       "two short high tones", ...
    <cache>/model/     a Qwen2-Audio checkpoint (config.json with audio_config and text_config,
                       model.safetensors in the hub layout) + tokenizer.json holding the chat and audio
                       special tokens of Qwen2-Audio-Instruct, a WordPiece over the demo's closed vocabulary

The model is a RANDOM-INIT preset, not a pretrained one: the demo exercises the whole pipeline (the
loading path of a real checkpoint, the chat template, placeholder expansion, LoRA, generation) and
shows LoRA learning to answer from frozen random audio features; its numbers say nothing about
Qwen2-Audio itself. Everything is deterministic for a seed, and rebuilt when VERSION changes.
"""

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from data.demo_models import build_wordpiece, save_checkpoint
from data.demo_sounds import ATTRIBUTES, render_clip
from common.atomic import atomic_write_text, build_directory_once
from models.audio import SAMPLE_RATE
from models.llama import LlamaConfig, LlamaForCausalLM
from models.qwen2_audio import (AUDIO, CHAT_TOKENS, END_OF_TEXT, IM_END, Qwen2AudioConfig,
                                Qwen2AudioForConditionalGeneration, chat_prompt)

VERSION = 1  # bump when anything below changes what is generated
N_TRAIN_CLIPS, N_EVAL_CLIPS = 320, 40  # two questions each: 640 training and 80 evaluation examples
DEMO_SEED = 0  # the demo is one fixed data set and model: a run's --seed is the training's randomness only
KINDS = ("tones", "tones", "chirp", "noise", "clicks")  # tones twice: they carry the most attributes
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
UNK = "[UNK]"
SPECIAL_TOKENS = [END_OF_TEXT, *[t for t in CHAT_TOKENS if t != END_OF_TEXT], UNK]  # <|endoftext|> first: the pad, id 0
MODEL_PRESET = dict(  # Qwen2-Audio-7B shrunk to a few CPU minutes: 128 mel bins kept, everything else tiny
    audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=128, d_model=64, encoder_layers=2,
                      encoder_attention_heads=4, encoder_ffn_dim=256, max_source_positions=1500),
    text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                     use_sliding_window=False),
)


def questions(segment: dict, rng) -> list[tuple[str, str]]:
    """Two (question, answer) pairs about one sound event: one on an attribute of its kind, one on the whole."""
    kind = segment["kind"]
    if kind == "tones":
        count, pitch, length = COUNT_WORDS[segment["count"]], segment["pitch"], segment["length"]
        specific = [("How many tones do you hear?", count), ("Is the tone high or low?", pitch)][rng.integers(2)]
        description = f"{count} {length} {pitch} tone{'s' if segment['count'] > 1 else ''}"
        kind_answer = "tones"
    elif kind == "chirp":
        direction = "rises" if segment["direction"] == "rising" else "falls"
        specific, description, kind_answer = (("Does the pitch rise or fall?", direction),
                                              f"a {segment['direction']} chirp", "a chirp")
    elif kind == "noise":
        specific = ("Is the noise loud or quiet?", segment["loudness"])
        description, kind_answer = f"{segment['loudness']} {segment['colour']} noise", "noise"
    else:
        specific, description, kind_answer = (("Are the clicks slow or fast?", segment["rate"]),
                                              f"{segment['rate']} clicks", "clicks")
    general = [("What kind of sound is this?", kind_answer),
               ("Describe the sound briefly.", description)][rng.integers(2)]
    return [specific, general]


def sample_event(rng) -> dict:
    kind = KINDS[rng.integers(len(KINDS))]
    return {"kind": kind, **{name: values[rng.integers(len(values))] for name, values in ATTRIBUTES[kind].items()}}


def write_sounds(directory: Path, n_train: int, n_eval: int, seed: int) -> dict:
    """audio/*.wav, train.jsonl and eval.jsonl (two questions per clip), texts.txt (every prompt and answer)."""
    (directory / "audio").mkdir(parents=True)
    texts = set()
    for split_id, (split, n_clips) in enumerate([("train", n_train), ("eval", n_eval)]):
        rng, lines = np.random.default_rng([seed, 7, split_id]), []
        for index in range(n_clips):
            segment = sample_event(rng)
            relative = f"audio/{split}_{index:04d}.wav"
            sf.write(directory / relative, render_clip([segment], rng), SAMPLE_RATE, subtype="PCM_16")
            for prompt, answer in questions(segment, rng):
                lines.append(json.dumps({"audio": relative, "prompt": prompt, "answer": answer}) + "\n")
                texts |= {prompt, answer}
        atomic_write_text(directory / f"{split}.jsonl", "".join(lines))
    # every question and answer of both splits: the vocabulary is closed, nothing may become [UNK]
    atomic_write_text(directory / "texts.txt", "".join(f"{t}\n" for t in sorted(texts)))
    return {"train_data": str(directory / "train.jsonl"), "eval_data": str(directory / "eval.jsonl")}


def init_by_fan_in(module: torch.nn.Module, seed: int):
    """Unit-variance embeddings and every Linear / Conv1d weight N(0, 1 / fan_in), biases zero, norms one
    (the tower's positional table keeps its sinusoids): the scaling transformers uses for T5
    (data/demo_models.py init_t5_like_transformers). At Qwen2-Audio's own 0.02 a model this small is blind
    to its input: with a 0.02 language model the answer loss barely moved in 60 steps (4.09 -> 3.59); with
    a 0.02 tower, whose output is then mostly its positional table, exact match reached 38% after 400
    steps, against 54% with this init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Embedding) and name != "embed_positions":  # the tower's sinusoids stay
                m.weight.normal_(0.0, 1.0, generator=generator)
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)):
                m.weight.normal_(0.0, m.weight[0].numel() ** -0.5, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()


def write_model(directory: Path, texts: list[str], seed: int) -> str:
    """A tiny Qwen2-Audio in the hub layout, random weights scaled by fan-in (`init_by_fan_in`), with its
    tokenizer.json."""
    template_words = [chat_prompt(text) for text in texts]
    for token in CHAT_TOKENS:  # the vocabulary needs the template's words, not pieces of its special tokens
        template_words = [text.replace(token, " ") for text in template_words]
    tokenizer = build_wordpiece(template_words + texts, SPECIAL_TOKENS, UNK, "$A")
    ids = {token: tokenizer.token_to_id(token) for token in (AUDIO, IM_END, END_OF_TEXT)}
    text_config = {**MODEL_PRESET["text_config"], "vocab_size": tokenizer.get_vocab_size(), "eos_token_id": ids[IM_END],
                   "pad_token_id": ids[END_OF_TEXT], "bos_token_id": None}
    config = {"model_type": "qwen2_audio", "architectures": ["Qwen2AudioForConditionalGeneration"],
              "audio_config": MODEL_PRESET["audio_config"], "text_config": text_config, "audio_token_index": ids[AUDIO]}
    parsed = Qwen2AudioConfig.from_hf(config)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG: the run's must not move
        model = Qwen2AudioForConditionalGeneration(parsed, LlamaForCausalLM(LlamaConfig.from_hf(text_config)))
    init_by_fan_in(model.audio_tower, seed + 4)
    init_by_fan_in(model.multi_modal_projector, seed + 5)
    init_by_fan_in(model.language_model, seed + 6)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "tokenizer.json", tokenizer.to_str(pretty=True))
    save_checkpoint(directory, config, model.state_dict())
    return str(directory)


def ensure_demo_audio_qa(cache_dir, n_train: int = N_TRAIN_CLIPS, n_eval: int = N_EVAL_CLIPS, seed: int = DEMO_SEED,
                         verbose: bool = True) -> dict[str, str]:
    """{"model", "train_data", "eval_data"} of the demo under `cache_dir`, built once however many processes
    ask at once (common/atomic.py build_directory_once), and again when missing, damaged, or made with other
    parameters. The demo is fixed data: `seed` is not a run's --seed."""
    cache_dir = Path(cache_dir)

    def build(scratch):
        write_sounds(scratch / "sounds", n_train, n_eval, seed)
        texts = (scratch / "sounds" / "texts.txt").read_text(encoding="utf-8").splitlines()
        write_model(scratch / "model", texts, seed)
        if verbose:
            print(f"demo audio-qa: {2 * n_train} training and {2 * n_eval} evaluation questions about synthetic "
                  f"sounds, and a tiny RANDOM-INIT Qwen2-Audio, written to {cache_dir}")

    build_directory_once(cache_dir, {"version": VERSION, "seed": seed, "n_train": n_train, "n_eval": n_eval}, build)
    return {"model": str(cache_dir / "model"), "train_data": str(cache_dir / "sounds" / "train.jsonl"),
            "eval_data": str(cache_dir / "sounds" / "eval.jsonl")}
