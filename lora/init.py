"""How lora_A and lora_B start: PEFT's `init_lora_weights`, written out, one function each.

    default   A Kaiming-uniform (a=√5), B = 0                      (LinearWithLoRA.reset_lora_parameters)
    gaussian  A ~ N(0, (1/r)²), B = 0                              PEFT: nn.init.normal_(A, std=1/r)
    pissa     A, B from the top-r SVD of W; the base becomes W - s·B·A    (Meng et al. 2024, arXiv:2404.02948)
    olora     A, B from the QR decomposition of W; base W - s·B·A         (Büyükakyüz 2024, arXiv:2406.01775)

default and gaussian make the update exactly zero, so a fresh model is the base model. PiSSA and
OLoRA instead put the weight's principal part in the adapter and leave the *residual* in the base:
the function is unchanged at the start (W_res + s·B·A = W up to fp32 rounding), but the base weight
is no longer the checkpoint's. Three ways to get the trained model back, all PEFT's:

1. Keep the model: merge_lora onto the residual base gives the trained weights (W_res + s·B'·A').
2. Re-run the init: an adapter whose config says "pissa"/"olora" is loaded (here, as in PEFT's
   from_pretrained) onto the *original* base by running the same init first, which recomputes
   W_res, then copying the trained A, B over. SVD and QR are deterministic, so this is exact up to
   the rounding of the machine's LAPACK; pissa_niter_N draws a random start (torch.svd_lowrank) and
   is reproduced only under the same torch seed and the same RNG use before it.
3. Convert to plain LoRA (PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion=)`):
   the trained update relative to the *original* W is s·B'A' - s·B₀A₀ = s·[B' | -B₀]·[A' ; A₀], a
   LoRA of rank 2r (alpha doubled, or ×√2 with rsLoRA, so the scale is unchanged) that needs no
   residual base: `subtract_initial` below; save_adapter(..., initial=initial_adapter(model)) writes
   it. This is the format to hand to anything that merges onto the checkpoint (an export, another
   LoRA stack). Snapshot initial_adapter(model) right after inject_lora, before the first step.
"""

import dataclasses

import torch
from torch import nn

from lora.config import LoRAConfig
from lora.quant import NF4Tensor


def initialise(layer, init: str):
    """Start `layer` (a LinearWithLoRA whose lora_A/lora_B were just built) as `init` says (LoRAConfig.init)."""
    if init == "default":
        layer.reset_lora_parameters()
    elif init == "gaussian":
        gaussian_init(layer)
    elif init == "olora":
        olora_init(layer)
    elif init == "pissa" or init.startswith("pissa_niter_"):
        pissa_init(layer, niter=None if init == "pissa" else int(init.removeprefix("pissa_niter_")))
    else:
        raise ValueError(f"unknown LoRA init {init!r}")


@torch.no_grad()
def gaussian_init(layer):
    """A ~ N(0, std=1/r), B = 0: PEFT's "gaussian" (its std is 1/r, not 1/√r)."""
    nn.init.normal_(layer.lora_A.weight, std=1 / layer.r)
    _zero_b(layer)


@torch.no_grad()
def pissa_init(layer, niter: int | None = None):
    """PiSSA: W = U S Vᵀ; A = √(S_r/s)·V_rᵀ, B = U_r·√(S_r/s), base W - s·B·A (PEFT's pissa_init, in fp32).

    Dividing S by the scaling s makes s·B·A the rank-r principal part of W itself. `niter` selects
    PEFT's "pissa_niter_N": torch.svd_lowrank with N subspace iterations, random start from the global RNG.
    """
    weight = _float_base(layer, "pissa")
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in)
        u_r, s_r, vh_r = u[:, : layer.r], s[: layer.r], vh[: layer.r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(weight, layer.r, niter=niter)  # (out, r), (r,), (in, r)
        vh_r = v_r.t()
    s_r = s_r / layer.scaling
    lora_a = torch.diag(torch.sqrt(s_r)) @ vh_r  # (r, in)
    lora_b = u_r @ torch.diag(torch.sqrt(s_r))  # (out, r)
    _set_adapter_and_residual(layer, lora_a, lora_b, weight)


@torch.no_grad()
def olora_init(layer):
    """OLoRA: W = Q R; B = Q[:, :r] (orthonormal columns), A = R[:r], base W - s·B·A (PEFT's olora_init).

    Unlike PiSSA, A and B are not rescaled by s, so s·B·A is s times the first r rank-one parts of QR.
    """
    weight = _float_base(layer, "olora")
    q, r = torch.linalg.qr(weight)  # (out, k), (k, in)
    _set_adapter_and_residual(layer, r[: layer.r].contiguous(), q[:, : layer.r].contiguous(), weight)


def refusal(base, r: int, init: str, path: str = "") -> str | None:
    """Why `init` cannot start a rank-`r` LoRA on `base` (an nn.Linear, NF4Linear or LinearWithLoRA), or None.
    inject_lora asks before it changes anything, so a refused init leaves the whole model as it was."""
    if not modifies_base(init):
        return None
    where = path or getattr(base, "module_path", "") or "a layer"
    if isinstance(base.weight, NF4Tensor):
        # PEFT refuses PiSSA on a quantized base as well: the residual must be quantized, not the original.
        return (f"LoRA init {init!r} on {where}: its base weight is 4-bit NF4. Initialise on the 16-bit model, "
                "save its residual weights (lora/init.py), and quantize those instead.")
    k = min(base.in_features, base.out_features)
    if r > k:
        return (f"LoRA init {init!r} on {where}: rank {r} exceeds min(in, out) = {k}, the most singular (or QR) "
                "directions the weight has; lower its rank (rank_pattern)")
    return None


def _float_base(layer, init: str) -> torch.Tensor:
    problem = refusal(layer, layer.r, init)
    if problem:
        raise ValueError(problem)
    return layer.weight.detach().to(torch.float32)


def _set_adapter_and_residual(layer, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor):
    layer.lora_A.weight.copy_(lora_a)
    layer.lora_B.weight.copy_(lora_b)
    # A bias on lora_B is zeroed so the start is still the base's function; PEFT leaves it at nn.Linear's random init.
    if layer.lora_B.bias is not None:
        nn.init.zeros_(layer.lora_B.bias)
    residual = weight - layer.scaling * (layer.lora_B.weight.float() @ layer.lora_A.weight.float())
    # .data, as PEFT: the same Parameter object (its key, its ties) now holds the residual
    layer.weight.data = residual.to(layer.weight.dtype)


def _zero_b(layer):
    nn.init.zeros_(layer.lora_B.weight)
    if layer.lora_B.bias is not None:
        nn.init.zeros_(layer.lora_B.bias)


def modifies_base(init: str) -> bool:
    """Does this init move part of the base weight into the adapter (so the base must become the residual)?"""
    return init == "olora" or init.startswith("pissa")


def subtract_initial(trained: dict, initial: dict) -> dict:
    """PEFT's subtract_mutated_init: the trained PiSSA/OLoRA adapter as a plain LoRA of the original W.

    `trained` and `initial` map module paths to {"lora_A": A, "lora_B": B} (the adapter now, and
    right after the init). Returns {path: {"lora_A": [A ; A₀] (2r, in), "lora_B": [B | -B₀] (out, 2r)}}:
    s·B'·A' - s·B₀·A₀ exactly, once converted_config has doubled the ranks with the scale kept.
    """
    missing = sorted(set(trained) - set(initial))
    if missing:
        raise ValueError(f"the initial adapter has no weights for {missing[0]} ({len(missing)} layer(s)): "
                         "snapshot it with initial_adapter(model) right after inject_lora, before training")
    converted = {}
    for path, pair in trained.items():
        if set(pair) != {"lora_A", "lora_B"}:
            extra = sorted(set(pair) - {"lora_A", "lora_B"})
            raise ValueError(f"{path}: an adapter with {extra[0]} cannot be converted to plain LoRA (PEFT's conversion "
                             "concatenates lora_A and lora_B only); save it unconverted")
        converted[path] = {
            "lora_A": torch.cat([pair["lora_A"], initial[path]["lora_A"]], dim=0),
            "lora_B": torch.cat([pair["lora_B"], -initial[path]["lora_B"]], dim=1),
        }
    return converted


def converted_config(config: LoRAConfig) -> LoRAConfig:
    """The config of subtract_initial's adapter, as PEFT writes it: every rank doubled and every alpha with
    it (×√2 with rsLoRA, whose scale is alpha/√r), init back to "default" (the base is the original W)."""
    if config.rslora and (config.rank_pattern or config.alpha_pattern):
        # PEFT refuses this too: doubling a pattern's alpha keeps alpha/r, not alpha/√r, and ×√2 would change
        # modules the alpha_pattern does not name but the rank_pattern does
        raise ValueError("converting a PiSSA/OLoRA adapter with rsLoRA and rank_pattern/alpha_pattern is not supported "
                         "(as in PEFT); save it unconverted")
    alpha = config.alpha * 2**0.5 if config.rslora else config.alpha * 2
    return dataclasses.replace(config, r=2 * config.r, alpha=alpha, init="default",
                               rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                               alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})
