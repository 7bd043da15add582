"""Time and peak memory to get a usable Qwen2-Audio audio tower out of a large sharded checkpoint.

"Load only what is needed" (DESIGN.md): `load_audio_encoder` opens only the shards holding
`audio_tower.*` and never materialises the language model. This measures it against the usual
ways, on a generated Qwen2-Audio-shaped checkpoint (the real 7B tower: d_model 1280, 32 layers,
20 heads, 128 mels; a fake bf16 Qwen2 language model of --lm-layers x --lm-hidden):

    ours-bf16, ours-fp32   models.load_audio_encoder(dir, dtype)
    naive-mmap             safetensors load_file() of every shard into one dict, then pick audio_tower.*
    naive-pread            the same with backend="pread": every byte of every shard read into memory
    reference              transformers Qwen2AudioForConditionalGeneration.from_pretrained(dir, dtype=bf16)

Each run is a fresh process. "load" times the call; "ready" adds reading every tower weight once,
because safetensors' default mmap backend hands out tensors whose pages are read from disk (and
counted in RSS) only when first touched: a lazy whole-checkpoint load costs little until used.
Peak RSS is the child's VmHWM, file-backed pages included. torch's one-off lazy import on a
process's first nn.Embedding (~1 s) is paid before the clock starts, as `import transformers` is.
"cold" evicts the checkpoint's files from the OS page cache first (posix_fadvise DONTNEED: only
these files, no root needed; a host-side disk cache may still help); "warm" reads them all into it
first. Methods and cache states alternate, methods rotating each repeat; medians of --repeats.

Layout: keys in the order language model, projector, tower, packed greedily into ~2 GB shards
named as HF names them, so the tower straddles the last two shards and shares one with the
language model, as a 7B Qwen2-Audio spreads its tower over a couple of its shards.

    python bench/load_audio_tower.py                 # LM 12 x 4096: 6.3 GB in 4 shards, ~5 min on 2 cores
    python bench/load_audio_tower.py --lm-layers 4 --repeats 1 --cache warm --skip-reference --dir /tmp/ckpt --keep
"""

import argparse
import dataclasses
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
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import memory_status  # noqa: E402
import models.checkpoint  # noqa: E402
from models import load_audio_encoder  # noqa: E402
from models.checkpoint import INDEX, load_into  # noqa: E402
from models.qwen2_audio_encoder import Qwen2AudioEncoder, Qwen2AudioEncoderConfig  # noqa: E402

TOWER = Qwen2AudioEncoderConfig()  # the defaults are Qwen2-Audio-7B's tower
LM_VOCAB = 8192  # the real 156032 would only add two big tensors that nothing here reads
SHARD_BYTES = 2 * 10**9  # HF's max_shard_size counts decimal GB
MARKER = "bench-checkpoint.json"  # written last; holds the LM config the shards were made for
MEMORY_BUDGET = 12e9  # bytes one child may use on a shared machine
METHODS = ["ours-bf16", "ours-fp32", "naive-mmap", "naive-pread", "reference"]


def lm_config(hidden: int, layers: int) -> dict:
    # Qwen2-Audio-7B's text model: 4096 wide, 32 heads of 128, as many KV heads, MLP 11008 = 4096 * 43/16.
    return dict(model_type="qwen2", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 128,
                num_key_value_heads=hidden // 128, intermediate_size=hidden * 43 // 16, vocab_size=LM_VOCAB,
                max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16")


def checkpoint_shapes(lm: dict) -> dict[str, tuple[int, ...]]:
    """Hub-layout key -> shape, in file order: language model, projector, audio tower."""
    hidden, inner, shapes = lm["hidden_size"], lm["intermediate_size"], {}
    shapes["language_model.model.embed_tokens.weight"] = (LM_VOCAB, hidden)
    for i in range(lm["num_hidden_layers"]):
        layer = f"language_model.model.layers.{i}."
        for name in ("q", "k", "v"):  # Qwen2: biases on q, k, v; none on o_proj
            shapes |= {f"{layer}self_attn.{name}_proj.weight": (hidden, hidden),
                       f"{layer}self_attn.{name}_proj.bias": (hidden,)}
        shapes |= {f"{layer}self_attn.o_proj.weight": (hidden, hidden), f"{layer}mlp.down_proj.weight": (hidden, inner),
                   f"{layer}mlp.gate_proj.weight": (inner, hidden), f"{layer}mlp.up_proj.weight": (inner, hidden),
                   f"{layer}input_layernorm.weight": (hidden,), f"{layer}post_attention_layernorm.weight": (hidden,)}
    shapes |= {"language_model.model.norm.weight": (hidden,), "language_model.lm_head.weight": (LM_VOCAB, hidden),
               "multi_modal_projector.linear.weight": (hidden, TOWER.d_model),
               "multi_modal_projector.linear.bias": (hidden,)}
    with torch.device("meta"):  # our module's own names and shapes, at no memory cost
        tower = Qwen2AudioEncoder(TOWER)
    return shapes | {f"audio_tower.{key}": tuple(t.shape) for key, t in tower.state_dict().items()}


def gigabytes(shapes) -> float:
    return sum(2 * torch.Size(shape).numel() for shape in shapes) / 1e9  # bf16: 2 bytes an element


def tiled_tensor(shape, block: torch.Tensor) -> torch.Tensor:
    """A bf16 tensor tiled with one small random block: random-looking, written at memcpy speed."""
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    flat, rows = tensor.view(-1), tensor.numel() // len(block)
    flat[: rows * len(block)].view(rows, len(block)).copy_(block.expand(rows, len(block)))
    flat[rows * len(block):].copy_(block[: tensor.numel() - rows * len(block)])
    return tensor


def generate(directory: Path, lm: dict) -> None:
    """config.json, the shards (one in memory at a time), the index, and the marker last."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    audio = dataclasses.asdict(TOWER) | {"model_type": "qwen2_audio_encoder"}
    config = {"model_type": "qwen2_audio", "architectures": ["Qwen2AudioForConditionalGeneration"],
              "audio_config": audio, "text_config": lm, "audio_token_index": 151646, "dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shapes, shards, size = checkpoint_shapes(lm), [[]], 0
    for key, shape in shapes.items():  # greedy in file order, as save_pretrained
        if shards[-1] and size + 2 * torch.Size(shape).numel() > SHARD_BYTES:
            shards, size = shards + [[]], 0
        shards[-1].append(key)
        size += 2 * torch.Size(shape).numel()
    block = (torch.randn(1_000_003, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()  # prime length
    weight_map = {}
    for k, keys in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({key: tiled_tensor(shapes[key], block) for key in keys}, directory / name, metadata={"format": "pt"})
        with open(directory / name, "rb") as file:
            os.fsync(file.fileno())  # clean pages, which posix_fadvise can evict later
        weight_map |= dict.fromkeys(keys, name)
        print(f"  wrote {name}: {gigabytes(shapes[key] for key in keys):.2f} GB", flush=True)
    index = {"metadata": {"total_size": round(gigabytes(shapes.values()) * 1e9)}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2))
    (directory / MARKER).write_text(json.dumps(lm))


# ---- the child: one method in a fresh process ---------------------------------------------------


def load_naive(directory: Path, backend: str) -> Qwen2AudioEncoder:
    """What one writes without an index filter: every shard into one dict, then pick the tower."""
    state = {}
    for shard in sorted(directory.glob("model-*.safetensors")):
        state |= load_file(shard, backend=backend)
    tower_state = {key.removeprefix("audio_tower."): t for key, t in state.items() if key.startswith("audio_tower.")}
    with torch.device("meta"):
        tower = Qwen2AudioEncoder(Qwen2AudioEncoderConfig.from_hf(json.loads((directory / "config.json").read_text())))
    return load_into(tower, tower_state, f"{directory} [audio_tower.*]")


def load_reference(directory: Path) -> torch.nn.Module:
    from transformers import Qwen2AudioForConditionalGeneration

    model, info = Qwen2AudioForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16,
                                                                     output_loading_info=True)
    if any(info.values()):  # a key left to random init would make the reference look cheaper than it is
        raise RuntimeError(f"transformers did not load the checkpoint strictly: "
                           f"{ {k: v for k, v in info.items() if v} }")
    load_reference.model = model  # the whole model stays alive, as for a user of it
    return model.model.audio_tower


def child(method: str, directory: Path) -> None:
    import safetensors.torch

    loaders = {"ours-bf16": lambda: load_audio_encoder(directory, dtype=torch.bfloat16),
               "ours-fp32": lambda: load_audio_encoder(directory, dtype=torch.float32),
               "naive-mmap": lambda: load_naive(directory, "mmap"),
               "naive-pread": lambda: load_naive(directory, "pread"),
               "reference": lambda: load_reference(directory)}
    wrapped = [models.checkpoint, safetensors.torch]
    if method == "reference":
        import transformers.modeling_utils  # imported before the clock, and wrapped below

        wrapped.append(transformers.modeling_utils)
    opened = set()  # shard names, recorded by wrapping safe_open where each method calls it
    for module in wrapped:
        module.safe_open = lambda name, *a, _open=module.safe_open, **kw: (
            opened.add(Path(name).name) or _open(name, *a, **kw))
    with torch.device("meta"):
        torch.nn.Embedding(1, 1)  # torch imports torch._dynamo (~1 s) on a process's first Embedding
    base = memory_status("VmRSS")
    start = time.perf_counter()
    tower = loaders[method]()
    loaded = time.perf_counter()
    with torch.no_grad():
        for tensor in [*tower.parameters(), *tower.buffers()]:
            tensor.sum()  # reads every page of it
    ready = time.perf_counter()
    params = sum(p.numel() for p in tower.parameters())
    print(json.dumps(dict(load=loaded - start, ready=ready - start, peak=memory_status("VmHWM"), base=base,
                          shards=len(opened), params=params)))


# ---- the parent: generate, alternate, report ----------------------------------------------------


def set_page_cache(files: list[Path], cache: str) -> None:
    for path in files:
        with open(path, "rb") as file:
            if cache == "cold":
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while file.read(64 << 20):
                    pass


def run_child(method: str, directory: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", method, "--dir", str(directory)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args, directory: Path, shapes: dict) -> None:
    files = sorted(directory.glob("model-*.safetensors"))
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    tower_shards = sorted({shard[6:11] for key, shard in weight_map.items() if key.startswith("audio_tower.")})
    total = gigabytes(shapes.values())
    available = int(next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable")).split()[1]) * 1024
    budget = min(MEMORY_BUDGET, 0.8 * available)
    methods = [m for m in METHODS if not (m == "reference" and args.skip_reference)]
    for method in ("naive-pread", "reference"):  # may hold the whole checkpoint at once (pread does)
        if method in methods and total * 1e9 + 2e9 > budget:
            print(f"skipping {method}: it may need ~{total + 2:.1f} GB, over the budget of {budget / 1e9:.1f} GB")
            methods.remove(method)
    caches = ["cold", "warm"] if args.cache == "both" else [args.cache]

    results = {(m, c): [] for m in methods for c in caches}
    for repeat in range(args.repeats):
        order = methods[repeat % len(methods):] + methods[: repeat % len(methods)]
        for cache in caches:
            for method in order:
                set_page_cache(files, cache)
                results[method, cache].append(run_child(method, directory))
                print(f"  run {repeat + 1}/{args.repeats} {cache} {method:11s} "
                      f"ready {results[method, cache][-1]['ready']:6.2f} s", flush=True)

    params = {r["params"] for runs in results.values() for r in runs}
    assert len(params) == 1, f"the methods built towers of different sizes: {params}"
    lm_gb = gigabytes(s for k, s in shapes.items() if k.startswith("language_model."))
    tower_gb = gigabytes(s for k, s in shapes.items() if k.startswith("audio_tower."))
    print(f"\n$ python {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), {platform.machine()}, "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 1e9:.0f} GB RAM, torch {torch.__version__}, "
          f"python {platform.python_version()}")
    print(f"checkpoint: {total:.2f} GB bf16 in {len(files)} shards; "
          f"LM {args.lm_layers} x {args.lm_hidden} = {lm_gb:.2f} GB; "
          f"audio tower {params.pop() / 1e6:.0f}M params = {tower_gb:.2f} GB in shards {', '.join(tower_shards)}")
    print(f"medians of {args.repeats}, each run a fresh process; ready = load + read every tower weight once\n")
    print(f"{'method':12s} {'cache':5s} {'load s':>7s} {'ready s':>8s} {'peak RSS GB':>12s} {'RSS before GB':>14s} "
          f"{'shards opened':>14s}")
    median = {key: {f: statistics.median(r[f] for r in runs) for f in ("load", "ready", "peak", "base")}
              for key, runs in results.items()}
    for (method, cache), m in median.items():
        shards = f"{results[method, cache][0]['shards']}/{len(files)}"
        print(f"{method:12s} {cache:5s} {m['load']:7.2f} {m['ready']:8.2f} {m['peak'] / 1e9:12.2f} "
              f"{m['base'] / 1e9:14.2f} {shards:>14s}")
    print()
    for cache in caches:
        for other in methods[2:]:
            ours, them = median["ours-bf16", cache], median[other, cache]
            print(f"{cache} ours-bf16 / {other:11s}  ready time {ours['ready'] / them['ready']:5.2f}   "
                  f"peak RSS {ours['peak'] / them['peak']:5.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path,
                        help="where the checkpoint is made, or reused (default: in the temp dir, deleted after unless "
                             "--keep)")
    parser.add_argument("--lm-layers", type=int, default=12, help="fake Qwen2 LM layers (the real 7B has 32)")
    parser.add_argument("--lm-hidden", type=int, default=4096,
                        help="fake LM width, a multiple of 128 (the real 7B: 4096)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", choices=["both", "cold", "warm"], default="both",
                        help="OS page cache state before each run")
    parser.add_argument("--skip-reference", action="store_true", help="do not run transformers")
    parser.add_argument("--keep", action="store_true", help="keep a checkpoint generated in the temp dir")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.dir)

    lm = lm_config(args.lm_hidden, args.lm_layers)
    shapes = checkpoint_shapes(lm)
    directory = args.dir or Path(tempfile.gettempdir()) / f"qwen2-audio-bench-{args.lm_layers}x{args.lm_hidden}"
    marker = directory / MARKER
    created = not marker.is_file() or json.loads(marker.read_text()) != lm
    if created and args.dir is not None and directory.is_dir() and any(directory.iterdir()) and not marker.is_file():
        sys.exit(f"{directory} holds files but no {MARKER}: not overwriting it; pass a new or empty --dir")
    try:
        if created:
            print(f"generating {gigabytes(shapes.values()):.2f} GB of bf16 weights into {directory}", flush=True)
            start = time.perf_counter()
            generate(directory, lm)
            print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
        measure(args, directory, shapes)
    finally:
        if created and args.dir is None and not args.keep:
            shutil.rmtree(directory)
            print(f"\ndeleted {directory} (pass --keep to reuse it)")


if __name__ == "__main__":
    main()
