"""The worker of bench/memory_7b.py: one (case, implementation) measured in a process of its own. It builds
the case's batch with the toolkit's collates, loads and LoRA-wraps the model the implementation's way (ours:
the toolkit's loaders and lora/; the reference: transformers + PEFT, + bitsandbytes for nf4), runs the
training steps and returns load time, peak memory and s/step. What is measured, and how, is said in
bench/memory_7b.py's docstring.
"""

import gc
import math
import sys
import time

import numpy as np
import torch

from bench.measure import device_name, memory_status, synchronize
from bench.memory_7b_checkpoints import ANSWER, CAPTIONS, PROGRESS, QA_PROMPT, VQA_PROMPT

LORA = dict(r=16, alpha=32, dropout=0.1)
LR = 1e-4
CASES = {
    "a": ("(a) audio-text", [r"audio_tower.*self_attn\.(q|k|v|out)_proj"]),
    "b": ("(b) audio-qa", [r"language_model.*self_attn\.(q|k|v|o)_proj", r"audio_tower.*self_attn\.(q|k|v|out)_proj"]),
    "c": ("(c) instructblip", [r"qformer.*\.(query|key|value)"]),
}
REFERENCE_IMAGE_TOKEN = 0  # transformers 5 needs image_token_index; `<unk>` never occurs in the benchmark's text


# ---- the batches: built once, before the clock, by the toolkit's collates ----------------------


def speech_like_clip(seed: int, seconds: float = 30.0) -> np.ndarray:
    """16 kHz float32: a few gliding harmonic tones over noise. Only the shape of the log-mel matters here."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000), dtype=np.float32) / 16000
    f0 = rng.uniform(100, 300) * (1 + 0.1 * np.sin(2 * np.pi * 0.2 * t))
    wave = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 6))
    return (0.3 * wave / 2.3 + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def audio_text_batch(dirs: dict) -> dict:
    from models import load_tokenizer
    from models.audio import clip_features, pad_clip_features
    from models.tokenizer import tokenize

    clips = [clip_features(speech_like_clip(i), 128) for i in range(2)]
    features, frame_mask = pad_clip_features(clips)  # (2, 128, 3000), (2, 3000): 30 s each, nothing padded
    input_ids, attention_mask = tokenize(load_tokenizer(dirs["bert"]), CAPTIONS)
    return dict(features=features, frame_mask=frame_mask, input_ids=input_ids, attention_mask=attention_mask)


def audio_qa_batch(dirs: dict) -> dict:
    from data.audio_qa import collate_audio_qa
    from models import load_qwen2_audio_tokenizer
    from models.audio import clip_features

    item = {"index": 0, "features": clip_features(speech_like_clip(0), 128), "prompt": QA_PROMPT, "answer": ANSWER,
            "path": "synthetic.wav", "line": 1, "where": "synthetic:1", "cache": None}
    batch = collate_audio_qa([item], load_qwen2_audio_tokenizer(dirs["qwen2-audio"]))
    keys = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "labels")
    return {key: batch[key] for key in keys}


def instructblip_batch(dirs: dict) -> dict:
    from PIL import Image

    from data.instructblip import collate_vqa
    from models import load_instructblip_tokenizers

    pixels = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    item = {"index": 0, "image": Image.fromarray(pixels), "prompt": VQA_PROMPT, "answer": ANSWER,
            "path": "synthetic.png", "line": 1, "where": "synthetic:1"}
    qformer_tok, lm_tok = load_instructblip_tokenizers(dirs["instructblip"])
    batch = collate_vqa([item], 224, qformer_tok, lm_tok, decoder_only=True)
    keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask", "labels")
    return {key: batch[key] for key in keys}


BATCHES = {"a": audio_text_batch, "b": audio_qa_batch, "c": instructblip_batch}


# ---- ours: the toolkit's API -----------------------------------------------------------------


def ours(case: str, impl: str, dirs: dict, device: torch.device):
    """(model, loss of the batch, optimizer, LoRA layers) built with the toolkit's own loaders and lora/."""
    from lora import LoRAConfig, cast_frozen, inject_lora, mark_only_lora_trainable
    from engine.training import param_groups, set_train_mode
    from models import load_audio_encoder, load_instructblip, load_qwen2_audio, load_text_encoder
    from models.audio_text import AudioTextModel
    from models.shard_loading import Quantize

    bf16, quantize = torch.bfloat16, Quantize() if impl == "ours-nf4" else None
    heads = []
    if case == "a":
        tower = load_audio_encoder(dirs["qwen2-audio"], dtype=bf16, quantize=quantize)  # only the tower's shards
        text = load_text_encoder(dirs["bert"], dtype=bf16)
        torch.manual_seed(0)
        model, heads = AudioTextModel(tower, text, embed_dim=256), ["audio_proj", "text_proj", "logit_scale"]
    elif case == "b":
        model = load_qwen2_audio(dirs["qwen2-audio"], dtype=bf16, quantize=quantize)
    else:
        model = load_instructblip(dirs["instructblip"], dtype=bf16, quantize=quantize)
    layers = inject_lora(model, LoRAConfig(CASES[case][1], r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"]))
    mark_only_lora_trainable(model, also=heads)
    cast_frozen(model, bf16)  # train.py's --precision bf16: frozen weights bf16, LoRA and heads fp32
    model.to(device)
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
    set_train_mode(model)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=LR, fused=True)
    return model, (lambda batch: model(**batch).loss), optimizer, len(layers)


# ---- the reference: transformers + PEFT (+ bitsandbytes) ---------------------------------------


def hf_load(cls, directory: str, impl: str, device: torch.device, allow_unexpected: str | None = None, **config):
    """cls.from_pretrained in bf16 (or bitsandbytes 4-bit), refusing a non-strict load: a key left to random
    init, or a shape mismatch, would make the reference cheaper than the real one."""
    kwargs = dict(dtype=torch.bfloat16, output_loading_info=True, **config)
    if impl == "hf-nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if impl == "hf-nf4" or device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}
    model, info = cls.from_pretrained(directory, **kwargs)
    bad = {key: value for key, value in info.items() if value and not (
        key == "unexpected_keys" and allow_unexpected and all(k.startswith(allow_unexpected) for k in value))}
    if bad:
        shown = {k: sorted(v)[:5] for k, v in bad.items()}
        raise RuntimeError(f"transformers did not load {directory} strictly: {shown}")
    return model


def with_peft(model, pattern: str):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=pattern)
    model = get_peft_model(model, config)
    return model, sum(isinstance(m, LoraLayer) for m in model.modules())


class ReferenceAudioText(torch.nn.Module):
    """(a) as one writes it with transformers + PEFT: the PEFT-wrapped tower, a frozen BertModel, the heads.
    Every frame of the 30 s clips is valid, so the tower gets no mask (Qwen2AudioModel builds none then)."""

    def __init__(self, tower, bert):
        super().__init__()
        self.audio_tower, self.text_tower = tower, bert
        self.audio_proj = torch.nn.Linear(tower.get_base_model().config.d_model, 256)
        self.text_proj = torch.nn.Linear(bert.config.hidden_size, 256)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, features, frame_mask, input_ids, attention_mask):
        import torch.nn.functional as F

        hidden = self.audio_tower(input_features=features).last_hidden_state  # (B, 750, D)
        with torch.no_grad():
            words = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
            real = attention_mask[..., None].to(words.dtype)
            pooled = (words * real).sum(1) / real.sum(1)
        audio = F.normalize(self.audio_proj(hidden.mean(1).float()), dim=-1)
        text = F.normalize(self.text_proj(pooled.float()), dim=-1)
        logits = self.logit_scale.exp() * audio @ text.T  # (B, B)
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def reference(case: str, impl: str, dirs: dict, device: torch.device):
    """(model, loss of the batch, optimizer, LoRA layers) with transformers + PEFT (+ bitsandbytes)."""
    import transformers

    transformers.logging.set_verbosity_error()
    patterns = CASES[case][1]
    if case == "a":
        whole = hf_load(transformers.Qwen2AudioForConditionalGeneration, dirs["qwen2-audio"], impl, device)
        tower = whole.model.audio_tower
        del whole  # a user training the tower keeps only it (a choice in the reference's favour)
        gc.collect()
        tower, n_layers = with_peft(tower, patterns[0].removeprefix("audio_tower"))
        bert = hf_load(transformers.BertModel, dirs["bert"], "hf-bf16", device, allow_unexpected="pooler.",
                       add_pooling_layer=False)
        model = ReferenceAudioText(tower, bert.requires_grad_(False))
        for head in (model.audio_proj, model.text_proj):  # not model.to(): a 4-bit tower refuses to be moved
            head.to(device)
        model.logit_scale.data = model.logit_scale.data.to(device)
        model.train()
        model.text_tower.eval()
        loss = lambda batch: model(**batch)  # noqa: E731
    elif case == "b":
        model = hf_load(transformers.Qwen2AudioForConditionalGeneration, dirs["qwen2-audio"], impl, device)
        # transformers 5 nests the parts under `model.` and renames language_model.model.* to model.language_model.*
        model, n_layers = with_peft(model, "(?:model\\.)?(?:" + "|".join(patterns) + ")")
        model.train()
        loss = lambda batch: model(**batch).loss  # noqa: E731
    else:
        model = hf_load(transformers.InstructBlipForConditionalGeneration, dirs["instructblip"], impl, device,
                        image_token_index=REFERENCE_IMAGE_TOKEN)
        model, n_layers = with_peft(model, "(?:model\\.)?(?:" + "|".join(patterns) + ")")
        model.train()
        queries = model.get_base_model().config.num_query_tokens

        def loss(batch):  # transformers 5's spelling: Q image placeholders in front of the text, labels -100 there
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            front = torch.full((len(ids), queries), REFERENCE_IMAGE_TOKEN, device=ids.device)
            inputs = dict(batch, input_ids=torch.cat([front, ids], 1),
                          attention_mask=torch.cat([torch.ones_like(front), mask], 1),
                          labels=torch.cat([torch.full_like(front, -100), labels], 1))
            return model(**inputs).loss
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    return model, loss, optimizer, n_layers


# ---- the worker: one implementation, one case, a fresh process -------------------------------------


host_load_peak = [0]  # the process's VmHWM before the reset after loading (VmHWM then restarts from VmRSS)


def peak_memory(device: torch.device, reset: bool = False) -> int:
    """Peak bytes since the last reset: torch.cuda.max_memory_allocated on CUDA, else VmHWM. reset=True then
    restarts the count (on CPU by writing 5 to /proc/self/clear_refs, which sets VmHWM to the current RSS)."""
    host = memory_status("VmHWM")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else host
    if reset:
        host_load_peak[0] = host
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
    return peak


def worker(spec: dict) -> dict:
    case, impl, device = spec["case"], spec["impl"], torch.device(spec["device"])
    if impl.startswith("hf"):
        import peft  # noqa: F401  imported before the clock, as ours are below
        import transformers  # noqa: F401
    import lora  # noqa: F401
    import models  # noqa: F401

    with torch.device("meta"):
        torch.nn.Embedding(1, 1)  # torch imports torch._dynamo (~1 s) on a process's first Embedding
    batch = {key: value.to(device) for key, value in BATCHES[case](spec["dirs"]).items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    build = reference if impl.startswith("hf") else ours
    model, loss_of, optimizer, n_layers = build(case, impl, spec["dirs"], device)
    synchronize(device)
    load_s = time.perf_counter() - start
    load_peak = peak_memory(device, reset=True)  # what loading held at most; the steps' peak is measured apart
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    four_bit = four_bit_layers(model, impl)
    if impl.endswith("nf4") and not four_bit:
        raise RuntimeError(f"{impl}: no Linear was quantized to 4 bits; the numbers would be a 16-bit model's")
    times, losses = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        synchronize(device)
        tick = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - tick)
        losses.append(loss.item())
        print(f"{PROGRESS}{impl} ({case}): step {len(times)} {times[-1]:.2f} s, loss {losses[-1]:.4f}",
              file=sys.stderr, flush=True)
    measured, train_peak = times[spec["warmup"]:], peak_memory(device)
    return dict(load_s=load_s, step_s=sum(measured) / len(measured), load_peak=load_peak, train_peak=train_peak,
                peak=max(load_peak, train_peak), host_peak=max(memory_status("VmHWM"), host_load_peak[0]),
                lora_layers=n_layers, four_bit=four_bit, trainable=trainable, losses=losses,
                device_name=device_name(device))


def four_bit_layers(model: torch.nn.Module, impl: str) -> int:
    """Linear layers held in 4 bits: ours' NF4 weights, or bitsandbytes' Linear4bit (PEFT wraps, not replaces, them)."""
    from lora.quant import NF4Tensor

    count = sum(isinstance(m, NF4Tensor) for m in model.modules())
    if impl == "hf-nf4":
        import bitsandbytes

        count += sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in model.modules())
    return count


