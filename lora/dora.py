"""DoRA: weight-decomposed low-rank adaptation, on top of the LoRA branch of lora/layer.py.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353) writes a
weight as a magnitude times a direction, W = m · V/||V||_c, and trains the two apart: the direction
through LoRA, the magnitude directly, one trainable number per output feature:

    W' = m · (W + s·B·A) / ||W + s·B·A||_c        m starts as ||W||_c, so W' = W while B = 0

||·||_c is the norm of each output feature's weight vector. The paper writes W as d×k (in×out), so
it says "column"; in torch's (out, in) layout it is the L2 norm of every row, one value per output.
The paper's §4.3 treats n = ||W + s·B·A||_c as a constant in backward: n follows the update's
value but gets no gradient, which saves the memory of its backward at almost no loss in accuracy.
PEFT detaches it, and so do we.

Ported op for op from PEFT 0.21.2 (`peft/tuners/lora/dora.py` DoraLinearLayer, `variants.py`
DoraLinearVariant), so outputs, gradients and merges agree with PEFT to float rounding. The forward
never forms W'. With x_d the LoRA branch's input:

    y = W'x + b = Wx + b  +  (m/n - 1) ⊙ (W x_d)  +  (m/n) ⊙ s·B·A x_d

Without dropout, or in eval mode, x_d = x and W x_d is the base result minus its bias: PEFT's fast
path reuses it, so DoRA costs one B@A and one (out, in) norm per call beyond LoRA; here the sum is also
regrouped as (m/n) ⊙ (Wx + b) + (1 - m/n) ⊙ b + ((m/n)·s·B)·A x, the scale folded into the (out, r)
factor B: one element-wise pass over the output instead of five. With dropout in
training x_d = dropout(x) and W x_d is one more matmul; the magnitude then rescales the dropped copy,
so the output is not exactly W'x: the paper's and PEFT's choice, kept.

QDoRA: over an NF4 base (lora/quant.py) W is dequantized per call for the norm (and for W x_d), like
the base term itself. Merging writes W' into `weight`; unmerging divides by m/n again, with the n of
the merge kept, because n cannot be recovered from W' (every row of W' has norm m, whatever n was).

Where we differ from PEFT, on purpose: B@A is a plain matmul (PEFT runs lora_B(lora_A(eye)) to suit
FSDP), and over a 16-bit base m is initialised in fp32 (PEFT computes it in bf16/fp16 and rounds it,
so its fresh DoRA layer differs from the base by up to 2^-9 relative; ours computes the base exactly).
"""

import torch
import torch.nn.functional as F
from torch import nn

from lora.quant import NF4Tensor, linear_nf4


def dense_weight(weight: torch.Tensor | NF4Tensor) -> torch.Tensor:
    """The base weight as a dense (out, in) tensor: an NF4 weight dequantized (QDoRA), a Parameter as it is."""
    return weight.dequantize() if isinstance(weight, NF4Tensor) else weight


def lora_weight(adapter: nn.Module) -> torch.Tensor:
    """B@A of an adapter (anything with lora_A, lora_B): (out, r) @ (r, in) -> (out, in), in their dtype."""
    return adapter.lora_B.weight @ adapter.lora_A.weight


def weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """n = ||W + s·B@A||_c, the L2 norm of every output row: (out, in) -> (out,)."""
    return torch.linalg.norm(weight + scaling * lora_weight, dim=1)


@torch.no_grad()
def init_magnitude(adapter: nn.Module, weight: torch.Tensor | NF4Tensor) -> None:
    """m = ||W + s·B@A||_c (||W||_c while B is zero), so the adapted layer starts as the base layer.

    W is promoted to the LoRA weights' dtype (fp32) before the norm, so a 16-bit base gives an
    fp32 m without rounding (see the module docstring for how PEFT differs there)."""
    norm = weight_norm(dense_weight(weight), lora_weight(adapter), adapter.scaling)
    adapter.lora_magnitude_vector.copy_(norm)


def dora_forward(x: torch.Tensor, result: torch.Tensor, weight, bias, adapter, training: bool) -> torch.Tensor:
    """The DoRA layer's output from the base layer's `result` = x·Wᵀ + b.

    `x` is already in the LoRA weights' dtype, `weight`/`bias` are the base layer's own, `adapter`
    holds lora_A, lora_B, lora_dropout, lora_magnitude_vector and scaling. Shapes: x (..., in),
    result and the output (..., out)."""
    dense = dense_weight(weight).to(x.dtype)
    with torch.no_grad():  # the paper's §4.3: n is a constant in backward, only m and the LoRA branch learn
        norm = weight_norm(dense, lora_weight(adapter).to(x.dtype), adapter.scaling)  # (out,)
    mag_norm_scale = (adapter.lora_magnitude_vector / norm).view(1, -1)  # (1, out), broadcast over (..., out)

    if training and not isinstance(adapter.lora_dropout, nn.Identity):
        x = adapter.lora_dropout(x)
        # W·dropout(x) is a new product; over NF4 it goes through linear_nf4 so backward keeps no dense W
        base_result = linear_nf4(x, weight) if isinstance(weight, NF4Tensor) else F.linear(x, dense)
        lora_result = adapter.lora_B(adapter.lora_A(x))  # (..., out)
        return result + (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * adapter.scaling
    # Without dropout x_d = x, and the sum regroups: b + (m/n)⊙(Wx + s·BAx) = (m/n)⊙result + (1 - m/n)⊙b + B'·Ax
    # with B' = (m/n)·s·B, an (out, r) matrix: the scale is folded into the LoRA factor, so the LoRA product is
    # accumulated in place into the scaled base result (addmm_ on a 2-D tensor of our own: no copy in backward).
    # One pass over (..., out) instead of PEFT's five (its terms differ in rounding only, ~1e-7): DoRA's step is
    # then close to LoRA's (bench/lora_variants.py measures both).
    scale = mag_norm_scale.view(-1)  # (out,)
    flat = result.reshape(-1, result.shape[-1])  # (tokens, out)
    out = flat * scale if bias is None else torch.addcmul((1 - scale) * bias.to(x.dtype), flat, scale)
    h = adapter.lora_A(x.reshape(-1, x.shape[-1]))  # (tokens, r); lora_B has no bias (lora_bias refuses DoRA)
    out.addmm_(h, (adapter.lora_B.weight * (scale * adapter.scaling).unsqueeze(1)).t())
    return out.view(result.shape)


def dora_merged_weight(weight, delta, magnitude) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', n) with W' = (m/n)·(W + ΔW) and n = ||W + ΔW||_c, for W, ΔW = s·B@A (out, in) in fp32.

    n is returned so unmerge can undo exactly this merge (see dora_unmerged_weight)."""
    norm = weight_norm(weight, delta, 1.0)  # ΔW already holds s, as PEFT's get_weight_norm(..., scaling=1)
    return (magnitude / norm).view(-1, 1) * (weight + delta), norm


def dora_unmerged_weight(merged, delta, magnitude, norm) -> torch.Tensor:
    """W = W'/(m/n) - ΔW with the n of the merge; exact up to the rounding of the two steps."""
    return merged / (magnitude / norm).view(-1, 1) - delta
