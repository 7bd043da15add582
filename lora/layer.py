"""LinearWithLoRA: a frozen nn.Linear plus a trainable low-rank update.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
learns W' = W + s·B·A with A (r×in) and B (out×r), r ≪ min(in, out), and s = alpha/r
(or alpha/√r with rsLoRA, Kalajdzievski 2023). The forward never forms W':

    y = x·Wᵀ + b + s · B(A(dropout(x)))

Ported in behaviour from PEFT's ``peft.tuners.lora.layer.Linear`` and shaped like torchtune's
``LoRALinear``: unlike PEFT, the base ``weight`` and ``bias`` stay attributes of this module
(the very same Parameter objects, no copy), so a checkpoint's keys are unchanged by injection
and a strict ``load_state_dict`` of the original checkpoint still works.

The base may also be an ``NF4Linear`` (QLoRA, lora/quant.py): ``weight`` is then the NF4Tensor
module, kept in place the same way, and the base term is computed by dequantizing it per call.
The LoRA weights, their keys and the adapter files are the same as over an nn.Linear.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora.quant import NF4Linear, NF4Tensor, linear_nf4


class LinearWithLoRA(nn.Module):
    """y = x·Wᵀ + b + scaling · B(A(dropout(x))), around an nn.Linear whose `weight` and `bias`
    Parameters it keeps as its own; `lora_A` (in→r) and `lora_B` (r→out) are bias-free Linears.
    Over an NF4Linear, `weight` is its NF4Tensor (frozen 4-bit codes) and merge() refuses."""

    def __init__(self, base: nn.Linear | NF4Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise TypeError(f"LinearWithLoRA wraps an nn.Linear (or an NF4Linear), got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        # The same Parameter objects (or NF4Tensor) as the wrapped layer: no copy, the keys stay `weight*`/`bias`.
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # None stays None, as in nn.Linear
        # LoRA weights stay fp32 when the base is half precision (PEFT's autocast_adapter_dtype):
        # a bf16 B@A update of size ~1e-4 against weights of size ~1e-2 would round to nothing. An NF4 base
        # reports its original dtype, so its LoRA weights are fp32 too, on the device of its codes.
        lora_dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        factory = dict(device=base.weight.device, dtype=lora_dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)  # in -> r
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)  # r -> out
        # PEFT uses Identity for p=0, so the branch costs nothing and RNG use is the same as PEFT's.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.module_path = ""  # set by inject_lora, so errors can say which layer they are about
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        """A as nn.Linear's default (Kaiming-uniform, a=√5), B zeros: the update starts at exactly 0.

        This is the paper's init (A random Gaussian in the paper, Kaiming-uniform in its code and
        PEFT), so a freshly injected model computes the base model's function bit for bit.
        """
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def adapter_params(self) -> list[str]:
        """Names of this layer's trainable adapter parameters (torchtune's convention)."""
        return ["lora_A.weight", "lora_B.weight"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, NF4Tensor):
            result = linear_nf4(x, self.weight, self.bias)  # dequantized per call, never kept for backward
        else:
            result = F.linear(x, self.weight, self.bias)
        if self.merged:
            return result  # the update already sits inside `weight`: one linear, nothing else
        result_dtype = result.dtype
        # As PEFT: the LoRA branch runs in the LoRA weights' dtype, the sum is cast back.
        x = x.to(self.lora_A.weight.dtype)
        result = result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return result.to(result_dtype)

    def delta_weight(self) -> torch.Tensor:
        """s·B@A in fp32, shape (out, in): what merge() adds to `weight`."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + s·B@A in fp32: the weight merge() writes back in `weight`'s dtype."""
        if isinstance(self.weight, NF4Tensor):
            # Requantizing W + s·B@A would round the small update away and lose the adapter.
            raise ValueError(
                f"cannot merge LoRA layer {self.module_path or '<unnamed>'}: its base weight is 4-bit NF4. Merge onto "
                "the checkpoint's original 16-bit weights instead (python -m models.export does), or keep the adapter."
            )
        return self.weight.float() + self.delta_weight()

    @torch.no_grad()
    def merge(self):
        """Fold the update into `weight` (in place) so inference costs one linear."""
        if self.merged:
            raise RuntimeError(f"LoRA layer {self.module_path or '<unnamed>'} is already merged")
        merged = self.merged_weight()
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"refusing to merge LoRA layer {self.module_path or '<unnamed>'}: the merged weight has "
                "non-finite values (NaN/inf in lora_A/lora_B, or an overflow in the base dtype). "
                "The weights are left unchanged."
            )
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtract the update merged by merge(); exact up to the rounding of `weight`'s dtype."""
        if not self.merged:
            raise RuntimeError(f"LoRA layer {self.module_path or '<unnamed>'} is not merged")
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"
        )
