"""The decoder-only language model's speed: LoRA training steps and greedy generation, ours against transformers
(+ PEFT for training).

A benchmark, not a test. Every measurement is a fresh worker process, so its peak memory is its own; the
sides alternate in one run (ours, ours packed, reference, then the reverse order on the next repeat), so drift
of a shared machine falls on all alike, and every ratio is taken against the reference of the same run.

    python bench/lm_throughput.py                     # CPU defaults: 4 layers, sequences up to 256: ~15 min, 2 cores
    python bench/lm_throughput.py --tiny              # tiny widths, one step: a smoke test
    python bench/lm_throughput.py --seq-len 2048 --layers 24 --batch-size 8            # the goals' shapes
    python bench/lm_throughput.py --device cuda --precision bf16 --seq-len 2048 --layers 24 --batch-size 8 \\
        --steps 5 --warmup 2 --repeats 3

The models, written once as sharded safetensors checkpoints (transformers' save_pretrained, seeded random init,
bf16 as the hub ships them) and loaded by both sides, in fp32 (or bf16 with --precision bf16):
  text   Qwen/Qwen2-0.5B's released config (QWEN2_0_5B: hidden 896, 14 heads, 2 KV heads, intermediate 4864,
         vocab 151,936, tied embeddings, rope_theta 1e6) with --layers of its 24 layers
  audio  a small whole Qwen2-Audio: the same language model (with Qwen2-Audio's vocabulary, 156,032, untied,
         as Qwen2-Audio-7B) behind a small Whisper-style audio tower (AUDIO_TOWER), the chat prompt with one
         30 s clip (750 audio placeholders) and a 32-token answer

Training (one step = forward, backward, AdamW on the LoRA weights), LoRA r 16, alpha 32, no dropout, on the
language model's q/k/v/o projections; the loss is on the answer tokens only (the last 32 of each text example,
the answer and <|im_end|> of each audio one), the same batches on every side:
  ours          models/llama.py (models/qwen2_audio.py), lora.inject_lora: padded batches, labels-only logits
  ours packed   the same examples packed into rows of at most --seq-len tokens (data/packing.py; the audio case
                in rows of --audio-pack tokens, collate_audio_qa(pack=...)): block-diagonal attention
  transformers  Qwen2ForCausalLM / Qwen2AudioForConditionalGeneration (attn_implementation="sdpa") wrapped by
                peft.get_peft_model with the same targets (the count of LoRA layers is checked), the padded batches
Text examples are random ids, --batch-size of them, lengths uniform in [--seq-len / 4, --seq-len], so a padded
batch is about as wide as its longest example, a third of it padding. tokens/s = the examples' real tokens (audio
placeholders included) / the seconds of a step: the median over --repeats of the mean over --steps after --warmup.
Peak memory: the worker's VmHWM on CPU (restarted after loading, through /proc/self/clear_refs, so it is the
steps' peak with the weights resident), torch.cuda.max_memory_allocated on CUDA; a goal not met splits it into
the loaded model and what the steps added.

Generation: greedy, --new-tokens new tokens (no eos: every row runs to the end) after a --prompt-len-token prompt
at batch 1 and 8, on the text model: ours (LlamaForCausalLM.generate, its KV cache preallocated) against
transformers' generate(do_sample=False). new tokens/s = batch x new tokens / seconds; the tokens of the two sides
are compared.

Where a goal is not met, what bounds it: one more step (or a shorter generation) of each side runs under
torch.profiler, and the share of its operator time spent in GEMMs (aten::mm/addmm/bmm/baddbmm/addmv...), in
the attention kernels and elsewhere is printed.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VERSION = 1  # bump when the written checkpoints change, so old ones are rewritten
LORA = dict(r=16, alpha=32, dropout=0.0)
TARGETS = {"text": r"model.*self_attn\.(q|k|v|o)_proj", "audio": r"language_model.*self_attn\.(q|k|v|o)_proj"}
ANSWER_TOKENS = 32  # the answer of every example, the only tokens with labels
LR = 1e-4
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv",
            "aten::_addmm_activation")
SIDES = {"ours": "ours", "ours-packed": "ours, packed", "hf": "transformers + PEFT"}
GENERATION_SIDES = {"ours": "ours", "hf": "transformers"}
# Qwen/Qwen2-0.5B's config.json as released (transformers 4.40.1); num_hidden_layers is --layers here.
QWEN2_0_5B = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
              "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
              "intermediate_size": 4864, "max_position_embeddings": 131072, "max_window_layers": 24,
              "model_type": "qwen2",
              "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
              "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
              "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
AUDIO_VOCAB = 156032  # Qwen2-Audio's language model vocabulary
AUDIO_TOWER = dict(num_mel_bins=128, d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                   max_source_positions=1500)  # Whisper-tiny's widths, Qwen2-Audio's 128 mels and 30 s of positions
TINY_TEXT = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, vocab_size=2048)
TINY_TOWER = dict(d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64)
ANSWER_WORDS = [f"w{i}" for i in range(40)]  # answers are ANSWER_TOKENS - 1 of them, then <|im_end|>
QUESTION = "what do you hear in this recording"


# ---- the checkpoints, written once ------------------------------------------------------------


def text_config(args) -> dict:
    config = dict(QWEN2_0_5B, num_hidden_layers=args.layers, max_window_layers=args.layers)
    return config | (TINY_TEXT if args.tiny else {})


def write_checkpoints(spec: dict) -> None:
    """The --write entry (a process of its own): the text model and the whole Qwen2-Audio, random init, bf16."""
    import transformers

    from data.demo_audio_qa import SPECIAL_TOKENS, UNK
    from data.demo_models import build_wordpiece
    from models.qwen2_audio import AUDIO, CHAT_TOKENS, chat_prompt

    transformers.logging.set_verbosity_error()
    root, text = Path(spec["root"]), spec["text_config"]
    torch.manual_seed(spec["seed"])
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**text))
    model.to(torch.bfloat16).save_pretrained(root / "text", max_shard_size="200MB")
    del model
    template = chat_prompt(QUESTION)
    for token in CHAT_TOKENS:
        template = template.replace(token, " ")
    tokenizer = build_wordpiece([template, QUESTION] + ANSWER_WORDS, SPECIAL_TOKENS, UNK, "$A")
    vocab = text["vocab_size"] if spec["tiny"] else AUDIO_VOCAB
    audio_text = dict(text, vocab_size=vocab, tie_word_embeddings=False)
    config = transformers.Qwen2AudioConfig(audio_config=spec["tower"], text_config=audio_text,
                                           audio_token_index=tokenizer.token_to_id(AUDIO))
    model = transformers.Qwen2AudioForConditionalGeneration(config)
    model.to(torch.bfloat16).save_pretrained(root / "audio", max_shard_size="200MB")
    tokenizer.save(str(root / "audio" / "tokenizer.json"))


def ensure_checkpoints(args) -> dict:
    root = Path(args.dir) / ("tiny" if args.tiny else f"layers{args.layers}")
    spec = dict(root=str(root), text_config=text_config(args), tower=AUDIO_TOWER | (TINY_TOWER if args.tiny else {}),
                tiny=args.tiny, seed=args.seed, version=VERSION)
    done = root / "DONE.json"
    if done.is_file() and json.loads(done.read_text()) == spec:
        print(f"reusing the checkpoints in {root}", flush=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, __file__, "--write", json.dumps(spec)], cwd=ROOT, capture_output=True,
                                text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if result.returncode != 0:
            raise RuntimeError(f"writing the checkpoints failed: {result.stderr[-2000:]}")
        done.write_text(json.dumps(spec))
        print(f"wrote the checkpoints in {root} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"text": str(root / "text"), "audio": str(root / "audio")}


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


def memory_status(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in bytes. Not ru_maxrss: Linux carries that over fork and exec."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field + ":")).split()[1]) * 1024


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


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# ---- the parent: alternating workers, the tables, the goals -------------------------------------------


def run_worker(spec: dict, timeout: float) -> dict:
    """One measurement in a fresh process; its last stdout line is its JSON result, or {"error": why}."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {last[0][:300]}"}
    return json.loads(lines[-1])


def measure(args, dirs: dict) -> tuple[dict, dict]:
    base = dict(dirs=dirs, device=args.device, precision=args.precision, seq_len=args.seq_len,
                batch_size=args.batch_size,
                steps=args.steps, warmup=args.warmup, seed=args.seed, vocab=text_config(args)["vocab_size"],
                audio_batch=args.audio_batch, audio_pack=args.audio_pack, clip_seconds=args.clip_seconds,
                new_tokens=args.new_tokens, prompt_len=args.prompt_len, generation_batches=args.generation_batches)
    training = {(case, side): [] for case in args.cases for side in SIDES}
    generation = {side: [] for side in GENERATION_SIDES}
    for repeat in range(args.repeats):
        flip = (lambda sides: sides if repeat % 2 == 0 else sides[::-1])  # noqa: E731
        for case in args.cases:
            for side in flip(list(SIDES)):
                spec = dict(base, kind="train", case=case, side=side, profile=repeat == 0 and not args.no_profile)
                result = run_worker(spec, args.timeout)
                training[case, side].append(result)
                shown = result.get("error") or (f"{result['tokens_per_s']:.1f} tokens/s, {result['step_s']:.2f} "
                                                f"s/step, peak {result['peak'] / 2**30:.2f} GiB")
                print(f"  repeat {repeat + 1}/{args.repeats} train {case:5s} {SIDES[side]:20s} {shown}", flush=True)
        if args.generation_batches:
            for side in flip(list(GENERATION_SIDES)):
                spec = dict(base, kind="generate", side=side, profile=repeat == 0 and not args.no_profile)
                result = run_worker(spec, args.timeout)
                generation[side].append(result)
                shown = result.get("error") or ", ".join(f"batch {b}: {r['tokens_per_s']:.1f} tokens/s"
                                                         for b, r in result.items())
                print(f"  repeat {repeat + 1}/{args.repeats} generate {GENERATION_SIDES[side]:20s} {shown}", flush=True)
    return training, generation


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if "error" not in r]
    return statistics.median(values) if values else None


def first_of(runs: list[dict], key: str):
    return next((r[key] for r in runs if "error" not in r and r.get(key) is not None), None)


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "not met"


def shares_text(shares: dict | None) -> str:
    if not shares:
        return "not profiled"
    return (f"GEMMs {100 * shares['gemm']:.0f}%, attention {100 * shares['attention']:.0f}%, "
            f"other {100 * shares['other']:.0f}%")


def memory_text(row: dict) -> str:
    """A peak split into what both sides hold alike (the loaded model: its weights, and on CPU the process) and
    what the steps added (activations, logits, gradients, optimizer state)."""
    gib = 2**30
    return (f"{row['peak'] / gib:.2f} GiB = {row['loaded'] / gib:.2f} loaded (weights {row['weights'] / gib:.2f}) + "
            f"{(row['peak'] - row['loaded']) / gib:.2f} added by the steps")


def report(args, training: dict, generation: dict, seconds: float) -> None:
    from importlib.metadata import version

    gib = 2**30
    command = "python bench/lm_throughput.py" + "".join(f" {a}" for a in sys.argv[1:])
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    cpu = names[0] if names else platform.machine()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    print(f"\n$ {command}\n{device}; {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads); torch "
          f"{torch.__version__}, transformers {version('transformers')}, peft {version('peft')}, "
          f"python {platform.python_version()}")
    text = text_config(args)
    shapes = ("TINY widths (--tiny): a smoke test, the numbers say nothing" if args.tiny else
              f"Qwen2-0.5B's widths with {args.layers} of its 24 layers" + (
                  "" if args.layers == 24 and args.seq_len == 2048 else
                  f" and sequences up to {args.seq_len} tokens: REDUCED for this machine, the goals are for 24 layers "
                  "at 2048 (--layers 24 --seq-len 2048)"))
    print(f"{shapes}; hidden {text['hidden_size']}, vocab {text['vocab_size']}; LoRA r {LORA['r']} on q/k/v/o; "
          f"{args.precision} on {args.device}; {args.warmup} warm-up + {args.steps} measured step(s), medians of "
          f"{args.repeats} run(s), every run a fresh process")
    print(f"text: {args.batch_size} examples of {max(ANSWER_TOKENS + 1, args.seq_len // 4)}-{args.seq_len} tokens, "
          f"{ANSWER_TOKENS} answer tokens each, packed into rows of <= {args.seq_len}; audio: {args.audio_batch} "
          f"clips of {args.clip_seconds:g} s, the chat prompt and a {ANSWER_TOKENS}-token answer, packed into rows "
          f"of <= {args.audio_pack}\n")

    print("Training (one step: forward, backward, AdamW on the LoRA weights)\n")
    head = ["case", "side", "tokens/s", "s/step", "peak GiB", "rows x width", "padding", "first loss", "LoRA layers",
            "tokens/s / ref", "peak / ref"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    rows = {}
    for case in args.cases:
        ref = training[case, "hf"]
        for side in SIDES:
            runs = training[case, side]
            if all("error" in r for r in runs):
                print(f"| {case} | {SIDES[side]} | failed: {runs[0]['error']} |" + " |" * (len(head) - 3))
                continue
            step = median_of(runs, "step_s")
            row = dict(rate=first_of(runs, "tokens") / step, step=step, peak=median_of(runs, "peak"),
                       loaded=median_of(runs, "loaded"), weights=first_of(runs, "weights"),
                       padding=first_of(runs, "padding"), loss=first_of(runs, "first_loss"),
                       shares=first_of(runs, "shares"), layers=first_of(runs, "lora_layers"),
                       shape=f"{first_of(runs, 'rows')} x {first_of(runs, 'width')}")
            rows[case, side] = row
            ref_step, ref_peak = median_of(ref, "step_s"), median_of(ref, "peak")
            ref_rate = first_of(ref, "tokens") / ref_step if ref_step else None
            cells = [case, SIDES[side], f"{row['rate']:.1f}", f"{row['step']:.3f}", f"{row['peak'] / gib:.2f}",
                     row["shape"], f"{100 * row['padding']:.1f}%", f"{row['loss']:.4f}", str(row["layers"]),
                     f"{row['rate'] / ref_rate:.2f}x" if ref_rate else "-",
                     f"{row['peak'] / ref_peak:.2f}x" if ref_peak else "-"]
            print("| " + " | ".join(cells) + " |")

    generated = {}
    if args.generation_batches:
        print(f"\nGreedy generation ({args.new_tokens} new tokens after a {args.prompt_len}-token prompt, "
              "text model)\n")
        head = ["batch", "side", "new tokens/s", f"s for {args.new_tokens}", "tokens/s / ref", "same tokens as ref"]
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for batch in map(str, args.generation_batches):
            ref_runs = [r[batch] for r in generation["hf"] if "error" not in r]
            for side in GENERATION_SIDES:
                runs = [r[batch] for r in generation[side] if "error" not in r]
                if not runs:
                    print(f"| {batch} | {GENERATION_SIDES[side]} | failed: {generation[side][0]['error']} |" + " |" * 3)
                    continue
                seconds, new = median_of(runs, "seconds"), int(batch) * args.new_tokens
                rate = new / seconds
                ref_rate = new / median_of(ref_runs, "seconds") if ref_runs else None
                same = "yes" if ref_runs and runs[0]["tokens"] == ref_runs[0]["tokens"] else "no" if ref_runs else "-"
                generated[batch, side] = dict(rate=rate, shares=runs[0]["shares"])
                cells = [batch, GENERATION_SIDES[side], f"{rate:.1f}", f"{seconds:.2f}",
                         f"{rate / ref_rate:.2f}x" if ref_rate else "-", same]
                print("| " + " | ".join(cells) + " |")

    tiny = ", tiny widths" if args.tiny else ""
    at = "" if args.seq_len == 2048 and args.layers == 24 and not args.tiny else \
        f" (measured at {args.seq_len} tokens, {args.layers} layers{tiny}: the goal is for 2048, 24)"
    lines, bounds = [], []
    ref = rows.get(("text", "hf"))
    for side in ("ours", "ours-packed"):
        ours = rows.get(("text", side))
        known = ours is not None and ref is not None
        speed = ours["rate"] / ref["rate"] if known else None
        memory = ours["peak"] / ref["peak"] if known else None
        lines.append(f"- training, {SIDES[side]}: >= 1.3x transformers + PEFT's tokens/s: "
                     f"{verdict(speed >= 1.3 if known else None)} ({speed or float('nan'):.2f}x){at}")
        lines.append(f"- training, {SIDES[side]}: <= 0.6x transformers + PEFT's peak memory: "
                     f"{verdict(memory <= 0.6 if known else None)} ({memory or float('nan'):.2f}x){at}")
        if known and speed < 1.3:
            bounds.append(f"  training step time, {SIDES[side]}: {shares_text(ours['shares'])}; transformers + PEFT: "
                          f"{shares_text(ref['shares'])}")
        if known and memory > 0.6:
            bounds.append(f"  peak memory, {SIDES[side]}: {memory_text(ours)}; transformers + PEFT: {memory_text(ref)}")
    if "1" in map(str, args.generation_batches):
        ours, ref_gen = generated.get(("1", "ours")), generated.get(("1", "hf"))
        known = ours is not None and ref_gen is not None
        speed = ours["rate"] / ref_gen["rate"] if known else None
        lines.append(f"- generation at batch 1 >= 1.5x transformers' tokens/s: "
                     f"{verdict(speed >= 1.5 if known else None)} ({speed or float('nan'):.2f}x)")
        if known and speed < 1.5:
            bounds.append(f"  generation at batch 1, ours: {shares_text(ours['shares'])}; transformers: "
                          f"{shares_text(ref_gen['shares'])}")
    print("\nGoals:\n" + "\n".join(lines))
    if bounds:
        print("What bounds the goals not met (time: shares of the profiled operators' time; memory: the peak split):\n"
              + "\n".join(bounds))
    print(f"\nbenchmark wall time {seconds / 60:.1f} min")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny widths, one step, short clips: a smoke test")
    parser.add_argument("--layers", type=int, help="decoder layers of the 24 (default 4; --tiny 2)")
    parser.add_argument("--seq-len", type=int, help="longest text example and packed row (default 256; --tiny 48)")
    parser.add_argument("--batch-size", type=int, help="text examples a step (default 4; --tiny 3)")
    parser.add_argument("--cases", default="text,audio", help="comma-separated: text, audio")
    parser.add_argument("--audio-batch", type=int, default=2, help="clips a step in the audio case")
    parser.add_argument("--audio-pack", type=int, default=2048, help="tokens a packed row holds in the audio case")
    parser.add_argument("--clip-seconds", type=float, help="length of every clip (default 30; --tiny 2)")
    parser.add_argument("--generation-batches", default="1,8", help="comma-separated batch sizes; '' skips generation")
    parser.add_argument("--new-tokens", type=int, help="greedy tokens to generate (default 128; --tiny 8)")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens before generation (default 32; --tiny 8)")
    parser.add_argument("--steps", type=int, help="measured training steps (default 1; --tiny 1)")
    parser.add_argument("--warmup", type=int, help="training steps run before the clock (default 1; --tiny 0)")
    parser.add_argument("--repeats", type=int, help="runs of each side, alternating (default 2; --tiny 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled step of the first repeat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one worker may take")
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "lora-mm-bench-lm-throughput"),
                        help="where the checkpoints are written once and reused")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_checkpoints(json.loads(args.write))
        return
    if args.worker:
        spec = json.loads(args.worker)
        torch.manual_seed(spec["seed"])
        print(json.dumps(train_worker(spec) if spec["kind"] == "train" else generate_worker(spec)))
        return
    defaults = dict(layers=2, seq_len=48, batch_size=3, clip_seconds=2.0, new_tokens=8, prompt_len=8, steps=1, warmup=0,
                    repeats=1) if args.tiny else dict(layers=4, seq_len=256, batch_size=4, clip_seconds=30.0,
                                                      new_tokens=128, prompt_len=32, steps=1, warmup=1, repeats=2)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    args.generation_batches = [int(b) for b in args.generation_batches.split(",") if b.strip()]
    if set(args.cases) - {"text", "audio"} or args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--cases from text, audio; --steps and --repeats >= 1, --warmup >= 0")
    if args.seq_len <= ANSWER_TOKENS:
        parser.error(f"--seq-len must exceed the {ANSWER_TOKENS}-token answer")
    start = time.perf_counter()
    dirs = ensure_checkpoints(args)
    training, generation = measure(args, dirs)
    report(args, training, generation, time.perf_counter() - start)


if __name__ == "__main__":
    main()
