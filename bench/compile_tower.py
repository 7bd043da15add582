"""Is `torch.compile` of the audio tower worth a --compile flag? Eager against compiled, measured
alternately in one run: forward + backward of a LoRA'd tower on full 30 s clips (one shape, so the
compiled graph is reused; bucketed training would see many shapes and recompile for each).

    python bench/compile_tower.py                 # whisper-base shape, batch 4, fp32 on the CPU
    python bench/compile_tower.py --device cuda --dtype bf16 --d-model 1280 --layers 32 --heads 20 --mels 128 --batch 8
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora import LoRAConfig, inject_lora, mark_only_lora_trainable  # noqa: E402
from models.qwen2_audio_encoder import Qwen2AudioEncoder, Qwen2AudioEncoderConfig  # noqa: E402


class Holder(nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.audio_tower = tower

    def forward(self, features, frame_mask):
        return self.audio_tower(features, frame_mask)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mels", type=int, default=80)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()
    torch.manual_seed(0)
    config = Qwen2AudioEncoderConfig(num_mel_bins=args.mels, d_model=args.d_model, encoder_layers=args.layers,
                                     encoder_attention_heads=args.heads, encoder_ffn_dim=4 * args.d_model)
    model = Holder(Qwen2AudioEncoder(config))
    inject_lora(model, LoRAConfig(r"audio_tower.*self_attn\.(q|k|v|out)_proj", r=16, alpha=32, dropout=0.1))
    mark_only_lora_trainable(model)
    model.to(args.device).train()
    features = torch.randn(args.batch, args.mels, 3000, device=args.device)
    frame_mask = torch.ones(args.batch, 3000, dtype=torch.bool, device=args.device)
    amp = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(forward) -> float:
        start = time.perf_counter()
        with amp:
            out = forward(features, frame_mask)
        out.float().pow(2).mean().backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    compiled = torch.compile(model)
    start = time.perf_counter()
    step(compiled)
    print(f"compile + first step: {time.perf_counter() - start:.1f} s")
    step(model)  # warm-up
    eager, fused = [], []
    for _ in range(args.repeats):
        eager.append(step(model))
        fused.append(step(compiled))
    e, c = statistics.median(eager), statistics.median(fused)
    print(f"eager     fwd+bwd median {e:.3f} s")
    print(f"compiled  fwd+bwd median {c:.3f} s")
    print(f"ratio compiled/eager = {c / e:.3f}  (below 1 means compile is faster)")


if __name__ == "__main__":
    main()
