"""Forward+backward time of our LinearWithLoRA against PEFT's lora.Linear on the same shapes.

A benchmark, not a test: it prints timings and their ratio measured in one run, alternating
the two layers so machine noise hits both alike. Needs the dev requirements (peft).

    python bench/lora_layer.py                      # 1280x1280, tokens 4x1500, r 16 (Qwen2-Audio attention)
    python bench/lora_layer.py --dim 1024 --tokens 2x512 --rank 8 --repeats 30 --device cuda
"""

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import time_step  # noqa: E402
from lora import LoRAConfig, inject_lora  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1280, help="in = out features (Qwen2-Audio d_model is 1280)")
    parser.add_argument("--tokens", default="4x1500", help="BxT tokens per step (1500 = one 30 s clip after conv2)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    dtype = getattr(torch, args.dtype)
    batch, length = (int(n) for n in args.tokens.split("x"))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(args.dim, args.dim)).to(args.device, dtype)
    base.requires_grad_(False)
    ours = copy.deepcopy(base)
    inject_lora(ours, LoRAConfig("0", r=args.rank, alpha=2 * args.rank, dropout=0.1))
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules="0", r=args.rank, lora_alpha=2 * args.rank,
                                                          lora_dropout=0.1))
    ours.train()
    peft.train()
    x = torch.randn(batch, length, args.dim, device=args.device, dtype=dtype)
    grad = torch.randn_like(x)

    for _ in range(args.warmup):
        time_step(ours, x, grad)
        time_step(peft, x, grad)
    ours_times, peft_times = [], []
    for _ in range(args.repeats):  # alternate, so drift and noise fall on both
        ours_times.append(time_step(ours, x, grad))
        peft_times.append(time_step(peft, x, grad))
    ours_ms, peft_ms = 1e3 * statistics.median(ours_times), 1e3 * statistics.median(peft_times)
    print(f"device={args.device} dtype={args.dtype} dim={args.dim} tokens={batch}x{length} r={args.rank} "
          f"repeats={args.repeats} threads={torch.get_num_threads()}")
    print(f"ours  LinearWithLoRA  fwd+bwd median {ours_ms:8.2f} ms")
    print(f"peft  lora.Linear     fwd+bwd median {peft_ms:8.2f} ms")
    print(f"ratio ours/peft = {ours_ms / peft_ms:.3f}  (below 1 means ours is faster)")


if __name__ == "__main__":
    main()
