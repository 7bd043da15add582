"""The decoder-only language model's speed: LoRA training steps and greedy generation, ours against transformers
(+ PEFT for training).

A benchmark, not a test. Every measurement is a fresh worker process, so its peak memory is its own; the
sides alternate in one run (ours, ours packed, reference, then the reverse order on the next repeat), so drift
of a shared machine falls on all alike, and every ratio is taken against the reference of the same run.

    python bench/lm_throughput.py                     # CPU defaults: 4 layers, sequences up to 256: ~5 min, 2 cores
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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.lm_throughput_report import report  # noqa: E402
from bench.lm_throughput_setup import (  # noqa: E402
    ANSWER_TOKENS, AUDIO_TOWER, GENERATION_SIDES, SIDES, TINY_TOWER, VERSION, text_config, write_checkpoints,
)
from bench.lm_throughput_worker import generate_worker, train_worker  # noqa: E402


# ---- the checkpoints, written once (bench/lm_throughput_setup.py) -------------------------------


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
    start = time.time()  # the wall clock: the parent mostly waits on its workers
    dirs = ensure_checkpoints(args)
    training, generation = measure(args, dirs)
    report(args, training, generation, time.time() - start)


if __name__ == "__main__":
    main()
