"""One measurement of bench/lm_throughput.py in a process of its own (`bench/lm_throughput.py --worker`): the
batches (the same examples on every side), the side's model with LoRA injected, the timed training steps or
greedy generation, the peak memory, and the share of the profiled operators' time spent in GEMMs and attention.
See bench/lm_throughput.py's docstring for what is measured and how.
"""

import statistics
import time

import torch

from bench.lm_throughput_setup import ANSWER_TOKENS, ANSWER_WORDS, LORA, QUESTION, TARGETS
from bench.measure import memory_status, synchronize

LR = 1e-4
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv",
            "aten::_addmm_activation")


# ---- the batches: the same examples on every side ------------------------------------------------


def text_examples(spec: dict) -> tuple[list[list[int]], list[list[int]]]:
    """--batch-size random examples, lengths uniform in [seq_len / 4, seq_len]; labels on the last ANSWER_TOKENS."""
    generator = torch.Generator().manual_seed(spec["seed"])
    low = max(ANSWER_TOKENS + 1, spec["seq_len"] // 4)
    lengths = torch.randint(low, spec["seq_len"] + 1, (spec["batch_size"],), generator=generator).tolist()
    tokens = [torch.randint(0, spec["vocab"], (n,), generator=generator).tolist() for n in lengths]
    return tokens, [[-100] * (len(t) - ANSWER_TOKENS) + t[-ANSWER_TOKENS:] for t in tokens]


def text_batch(spec: dict, packed: bool) -> tuple[dict, int]:
    from data.audio_qa import pad_rows
    from data.packing import pack_examples

    tokens, labels = text_examples(spec)
    if packed:
        rows = pack_examples(tokens, labels, spec["seq_len"], pad_id=0)
        batch = dict(input_ids=rows.input_ids, attention_mask=rows.attention_mask, labels=rows.labels,
                     position_ids=rows.position_ids, segment_ids=rows.segment_ids)
        return batch, rows.padding_share
    input_ids, attention_mask = pad_rows(tokens, 0)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=pad_rows(labels, -100)[0])
    return batch, 1 - attention_mask.float().mean().item()


def audio_batch(spec: dict, directory: str, side: str) -> tuple[dict, float]:
    """The collate's batch of --audio-batch clips. transformers' Qwen2-Audio takes exactly 3000 log-mel frames, so
    its clips are padded to 30 s; ours take the longest clip + 2 frames (the same for 30 s clips)."""
    import numpy as np

    from data.audio_qa import collate_audio_qa
    from models.audio import clip_features
    from models.qwen2_audio import load_qwen2_audio_tokenizer

    rng = np.random.default_rng(spec["seed"])
    items = []
    for i in range(spec["audio_batch"]):
        wave = (0.1 * rng.standard_normal(int(spec["clip_seconds"] * 16000))).astype(np.float32)
        answer = " ".join(rng.choice(ANSWER_WORDS, ANSWER_TOKENS - 1))  # + <|im_end|>: ANSWER_TOKENS scored
        items.append({"index": i, "features": clip_features(torch.as_tensor(wave), 128), "prompt": QUESTION,
                      "answer": answer, "path": f"clip{i}", "line": i + 1, "where": f"clip{i}", "cache": None})
    packed = side == "ours-packed"
    batch = collate_audio_qa(items, load_qwen2_audio_tokenizer(directory), pad_to_30s=side == "hf",
                             pack=spec["audio_pack"] if packed else None)
    keys = ("input_ids", "attention_mask", "labels", "input_features", "feature_attention_mask")
    keys += ("position_ids", "segment_ids") if packed else ()
    return {key: batch[key] for key in keys}, batch["padding_share"]


# ---- the workers: one side, one case, a fresh process --------------------------------------------


def memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else memory_status("VmRSS")


def memory_peak(device: torch.device, reset: bool = False) -> int:
    """Peak bytes since the last reset: VmHWM on CPU (reset by writing 5 to /proc/self/clear_refs, which sets it
    to the current RSS), else torch.cuda.max_memory_allocated."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    peak = memory_status("VmHWM")
    if reset:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    return peak


def operator_shares(profile, device: torch.device) -> dict:
    """Shares of the profiled operators' self time: GEMMs, attention kernels, everything else."""
    cuda = device.type == "cuda"
    events = [e for e in profile.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    time_of = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731
    total = sum(time_of(e) for e in events) or 1
    gemm = sum(time_of(e) for e in events if e.key in GEMM_OPS or "gemm" in e.key.lower())
    attention = sum(time_of(e) for e in events if "attention" in e.key.lower() or "flash" in e.key.lower()
                    or "varlen" in e.key.lower())
    return {"gemm": gemm / total, "attention": attention / total, "other": 1 - (gemm + attention) / total}


def build_training(spec: dict, device: torch.device, dtype: torch.dtype):
    """(model, number of LoRA layers) of one side, LoRA injected, in training mode."""
    case, side, directory = spec["case"], spec["side"], spec["dirs"][spec["case"]]
    if side == "hf":
        import transformers
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        transformers.logging.set_verbosity_error()
        cls = transformers.Qwen2ForCausalLM if case == "text" else transformers.Qwen2AudioForConditionalGeneration
        model = cls.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").to(device)
        # transformers 5 nests the parts under `model.` (model.language_model.layers...)
        pattern = r".*self_attn\.(q|k|v|o)_proj" if case == "text" else r"(?:model\.)?" + TARGETS["audio"]
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules=pattern))
        model.train()
        return model, sum(isinstance(m, LoraLayer) for m in model.modules())
    from engine.training import set_train_mode
    from lora import LoRAConfig, cast_frozen, inject_lora, mark_only_lora_trainable
    from models import load_qwen2_audio
    from models.llama import load_llama

    model = load_llama(directory, dtype=dtype) if case == "text" else load_qwen2_audio(directory, dtype=dtype)
    layers = inject_lora(model, LoRAConfig([TARGETS[case]], r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"]))
    mark_only_lora_trainable(model)
    cast_frozen(model, dtype)  # LoRA weights fp32 beside a bf16 base, as PEFT keeps its adapters
    model.to(device)
    set_train_mode(model)
    return model, len(layers)


def train_worker(spec: dict) -> dict:
    device, bf16 = torch.device(spec["device"]), spec["precision"] == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.device("meta"):
        torch.nn.Embedding(1, 1)  # torch imports torch._dynamo (~1 s) on a process's first Embedding: not timed
    packed = spec["side"] == "ours-packed"
    if spec["case"] == "text":
        batch, padding = text_batch(spec, packed)
    else:
        batch, padding = audio_batch(spec, spec["dirs"]["audio"], spec["side"])
    tokens = int(batch["attention_mask"].sum())
    batch = {key: value.to(device) for key, value in batch.items()}
    model, lora_layers = build_training(spec, device, dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    synchronize(device)
    memory_peak(device, reset=True)
    loaded = memory_now(device)  # the model ready to train (and on CPU the process itself): what the steps add to

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, losses = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        synchronize(device)
        tick = time.perf_counter()
        losses.append(step())
        synchronize(device)
        times.append(time.perf_counter() - tick)
    peak = memory_peak(device)
    shares = None
    if spec["profile"]:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            synchronize(device)
        shares = operator_shares(prof, device)
    step_s = statistics.fmean(times[spec["warmup"]:])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(step_s=step_s, tokens=tokens, tokens_per_s=tokens / step_s, peak=peak, loaded=loaded,
                weights=weights, first_loss=losses[0],
                padding=padding, rows=int(batch["input_ids"].shape[0]), width=int(batch["input_ids"].shape[1]),
                lora_layers=lora_layers, shares=shares)


def generate_worker(spec: dict) -> dict:
    """Greedy generation of --new-tokens after a --prompt-len prompt, at each batch size, on the text model."""
    device, dtype = torch.device(spec["device"]), torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    directory, n = spec["dirs"]["text"], spec["new_tokens"]
    if spec["side"] == "hf":
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.Qwen2ForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")
        model.generation_config.eos_token_id = None  # no eos: every row runs to the end, as ours with eos_token_id=()
        model.generation_config.pad_token_id = 0

        def generate(ids, new_tokens):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, num_beams=1)
            return out[:, ids.shape[1]:]
    else:
        from models.llama import load_llama

        model = load_llama(directory, dtype=dtype)

        def generate(ids, new_tokens):
            return model.generate(input_ids=ids, max_new_tokens=new_tokens, eos_token_id=())
    model = model.to(device).eval()
    results = {}
    for batch in spec["generation_batches"]:
        generator = torch.Generator().manual_seed(spec["seed"] + batch)
        ids = torch.randint(0, spec["vocab"], (batch, spec["prompt_len"]), generator=generator).to(device)
        with torch.no_grad():
            generate(ids, 4)  # warm-up: first-call allocations and kernel choices
            synchronize(device)
            tick = time.perf_counter()
            tokens = generate(ids, n)
            synchronize(device)
            seconds = time.perf_counter() - tick
            shares = None
            if spec["profile"]:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=activities) as prof:
                    generate(ids, min(n, 16))
                    synchronize(device)
                shares = operator_shares(prof, device)
        if tokens.shape != (batch, n):
            raise RuntimeError(f"{spec['side']} generated {tuple(tokens.shape)} tokens, not ({batch}, {n})")
        results[str(batch)] = dict(seconds=seconds, tokens_per_s=batch * n / seconds, shares=shares,
                                   tokens=tokens[0].tolist())
    return results
