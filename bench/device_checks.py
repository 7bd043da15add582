"""What only an accelerator can show, as one short script to run where a GPU is lent (never a test: CI has no
GPU). Each check prints PASS or FAIL with its numbers; the exit status is the number of failures.

    python bench/device_checks.py            # on a CUDA machine

1. Packed rows take torch's variable-length attention kernel on CUDA in bf16 (models/attention.py BlockCausal) and
   give the masked path's logits within bf16 rounding: the CPU tests check only the masked path.
2. bf16 autocast forward + backward of a LoRA layer on CUDA equals the fp32 computation within bf16 rounding.
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.packing import pack_examples  # noqa: E402
from lora import LoRAConfig, inject_lora  # noqa: E402
import models.attention  # noqa: E402
from models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_qwen2() -> LlamaForCausalLM:
    config = LlamaConfig.from_hf(dict(model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rope_theta=1e6))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model.eval()


def check_varlen(device: str) -> bool:
    model = tiny_qwen2().to(device, torch.bfloat16)
    generator = torch.Generator().manual_seed(5)
    examples = [torch.randint(3, 96, (n,), generator=generator).tolist() for n in (5, 4, 3, 7, 2)]
    packed = pack_examples(examples, [[-100] * len(e) for e in examples], budget=12, pad_id=0)
    inputs = dict(input_ids=packed.input_ids.to(device), attention_mask=packed.attention_mask.to(device),
                  position_ids=packed.position_ids.to(device), segment_ids=packed.segment_ids.to(device))
    calls, kernel = [], models.attention.varlen_kernel
    if kernel() is None:
        print("FAIL varlen: this torch has no variable-length attention kernel")
        return False
    models.attention.varlen_kernel = lambda: lambda *a, **k: (calls.append(1), kernel()(*a, **k))[1]
    with torch.no_grad():
        varlen = model(**inputs).logits.float()
        models.attention.varlen_kernel = lambda: None
        masked = model(**inputs).logits.float()
    models.attention.varlen_kernel = kernel
    real = packed.attention_mask.to(device).bool()
    difference = (varlen[real] - masked[real]).abs().max().item()
    ok = bool(calls) and difference <= 5e-2
    print(f"{'PASS' if ok else 'FAIL'} varlen: kernel used {bool(calls)}, max |varlen - masked| {difference:.3g}")
    return ok


def check_bf16_lora(device: str) -> bool:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256)).to(device)
    inject_lora(base, LoRAConfig(r"\d", r=8, alpha=16))
    x = torch.randn(64, 256, device=device)
    outputs, grads = [], []
    for autocast in (False, True):
        base.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = base(x)
        y.float().square().mean().backward()
        outputs.append(y.float())
        grads.append(base[0].lora_A.weight.grad.clone())
    out_error = ((outputs[1] - outputs[0]).abs().max() / outputs[0].abs().max()).item()
    grad_error = ((grads[1] - grads[0]).abs().max() / grads[0].abs().max()).item()
    ok = out_error < 3e-2 and grad_error < 1e-1
    print(f"{'PASS' if ok else 'FAIL'} bf16 LoRA: relative output error {out_error:.3g}, gradient {grad_error:.3g}")
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: these checks run where a GPU is lent")
        return 0
    print(torch.cuda.get_device_name(0), torch.__version__)
    return sum(not check("cuda") for check in (check_varlen, check_bf16_lora))


if __name__ == "__main__":
    sys.exit(main())
