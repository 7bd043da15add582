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

Two extensions, each off unless asked for, leave the plain path above as it is:

- DoRA (``use_dora=True``, lora/dora.py) adds a trainable magnitude ``lora_magnitude_vector`` (out,).
- Named adapters beside the default one (lora/multi_adapter.py) sit in ``lora_adapters[name]`` as
  ``LoRAAdapter`` modules holding the same parts under the same names; one adapter is active at a
  time. The default adapter's parts stay this module's own attributes, so its keys stay
  ``<path>.lora_A.weight``. A layer that only named adapters reach is a ``LinearWithAdapters``,
  the base class without a default adapter, which the default-adapter tools (lora_layers) skip.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora.dora import dora_forward, dora_merged_weight, dora_unmerged_weight, init_magnitude
from lora.init import initialise
from lora.quant import NF4Linear, NF4Tensor, linear_nf4

DEFAULT_ADAPTER = "default"  # PEFT's name for the first adapter


def add_adapter_parts(holder: nn.Module, layer: "LinearWithAdapters", r: int, alpha: float, dropout: float,
                      rslora: bool, lora_bias: bool, use_dora: bool):
    """Give `holder` one adapter's parts for `layer`: lora_A (in→r), lora_B (r→out, with a bias for PEFT's
    lora_bias), lora_dropout, scaling, and lora_magnitude_vector for DoRA. `holder` is the layer itself for
    the default adapter, a LoRAAdapter for a named one: the same attribute names either way, so the
    forward reads both alike."""
    if lora_bias and use_dora:
        raise ValueError("lora_bias and DoRA do not combine (PEFT refuses them too: DoRA rescales the bias by m/n)")
    holder.r, holder.alpha, holder.rslora = r, alpha, rslora
    holder.scaling = alpha / math.sqrt(r) if rslora else alpha / r
    # LoRA weights stay fp32 when the base is half precision (PEFT's autocast_adapter_dtype):
    # a bf16 B@A update of size ~1e-4 against weights of size ~1e-2 would round to nothing. An NF4 base
    # reports its original dtype, so its LoRA weights are fp32 too, on the device of its codes.
    lora_dtype = torch.float32 if layer.weight.dtype in (torch.float16, torch.bfloat16) else layer.weight.dtype
    factory = dict(device=layer.weight.device, dtype=lora_dtype)
    holder.lora_A = nn.Linear(layer.in_features, r, bias=False, **factory)  # in -> r
    holder.lora_B = nn.Linear(r, layer.out_features, bias=lora_bias, **factory)  # r -> out
    # PEFT uses Identity for p=0, so the branch costs nothing and RNG use is the same as PEFT's.
    holder.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    # DoRA's magnitude m, one per output row (lora/dora.py); None registers nothing, so plain LoRA has no key.
    magnitude = nn.Parameter(torch.empty(layer.out_features, **factory)) if use_dora else None
    holder.register_parameter("lora_magnitude_vector", magnitude)


def reset_adapter_parameters(holder: nn.Module, layer: "LinearWithAdapters"):
    """A as nn.Linear's default (Kaiming-uniform, a=√5), B (and its bias) zeros, DoRA's m = ||W||_c: the
    update starts at exactly 0.

    This is the paper's init (A random Gaussian in the paper, Kaiming-uniform in its code and
    PEFT), so a freshly injected model computes the base model's function bit for bit.
    """
    nn.init.kaiming_uniform_(holder.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(holder.lora_B.weight)
    if holder.lora_B.bias is not None:
        nn.init.zeros_(holder.lora_B.bias)
    if holder.lora_magnitude_vector is not None:
        init_magnitude(holder, layer.weight)  # after A and B, as PEFT: m = ||W + s·B@A||_c


class LoRAAdapter(nn.Module):
    """One named adapter of a layer (lora/multi_adapter.py): lora_A, lora_B, lora_dropout, scaling and, for
    DoRA, lora_magnitude_vector: the parts the default adapter keeps as LinearWithLoRA's own attributes."""

    def __init__(self, layer: "LinearWithAdapters", r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 lora_bias: bool = False, use_dora: bool = False):
        super().__init__()
        add_adapter_parts(self, layer, r, alpha, dropout, rslora, lora_bias, use_dora)
        reset_adapter_parameters(self, layer)

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dora={self.use_dora}"


class LinearWithAdapters(nn.Module):
    """A frozen nn.Linear (or NF4Linear) whose `weight` and `bias` it keeps as its own, plus named LoRA
    adapters in `lora_adapters`, of which the one named `active_adapter` (None: all off) adds its update.

    Used directly only for a layer that named adapters reach and the default adapter does not; a
    layer with the default adapter is a LinearWithLoRA."""

    def __init__(self, base: nn.Linear | NF4Linear):
        super().__init__()
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear (or an NF4Linear), got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        # The same Parameter objects (or NF4Tensor) as the wrapped layer: no copy, the keys stay `weight*`/`bias`.
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # None stays None, as in nn.Linear
        self.lora_adapters = nn.ModuleDict()  # named adapters (lora/multi_adapter.py); empty: no keys
        self.active_adapter: str | None = DEFAULT_ADAPTER
        self.merged = False
        self.merged_adapter: str | None = None  # whose update merge() put into `weight` (None: none here)
        self.merged_weight_norm = None  # DoRA's n at merge time, which unmerge needs (lora/dora.py)
        self.module_path = ""  # set by inject_lora, so errors can say which layer they are about

    def adapter(self, name: str | None) -> nn.Module | None:
        """The module holding adapter `name`'s parts, or None when this layer has no such adapter."""
        return self.lora_adapters[name] if name in self.lora_adapters else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, NF4Tensor):
            result = linear_nf4(x, self.weight, self.bias)  # dequantized per call, never kept for backward
        else:
            result = F.linear(x, self.weight, self.bias)
        # the module holding the active adapter's parts: this layer itself for the default adapter, a LoRAAdapter else
        adapter = None if self.merged else self.adapter(self.active_adapter)
        if adapter is None:
            return result  # merged (the update already sits inside `weight`), disabled, or not on this layer
        result_dtype = result.dtype
        # As PEFT: the LoRA branch runs in the LoRA weights' dtype, the sum is cast back.
        x = x.to(adapter.lora_A.weight.dtype)
        if adapter.lora_magnitude_vector is None:
            result = result + adapter.lora_B(adapter.lora_A(adapter.lora_dropout(x))) * adapter.scaling
        else:
            result = dora_forward(x, result.to(x.dtype), self.weight, self.bias, adapter, self.training)
        return result.to(result_dtype)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """s·B@A in fp32, shape (out, in), of adapter `name` (default: the active one)."""
        adapter = self._adapter_or_raise(self.active_adapter if name is None else name)
        return (adapter.lora_B.weight.float() @ adapter.lora_A.weight.float()) * adapter.scaling

    def merged_weight(self) -> torch.Tensor:
        """The active adapter's W' in fp32: W + s·B@A, or DoRA's m·(W + s·B@A)/||W + s·B@A||_c (W itself when
        this layer lacks the active adapter): the weight merge() writes back in `weight`'s dtype."""
        return self._merged()[0]

    def _merged(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(W', the new bias or None when it does not change, DoRA's n or None), in fp32."""
        if isinstance(self.weight, NF4Tensor):
            # Requantizing W + s·B@A would round the small update away and lose the adapter.
            raise ValueError(
                f"cannot merge LoRA layer {self.module_path or '<unnamed>'}: its base weight is 4-bit NF4. Merge onto "
                "the checkpoint's original 16-bit weights instead (python -m models.export does), or keep the adapter."
            )
        adapter = self.adapter(self.active_adapter)
        if adapter is None:
            return self.weight.float(), None, None
        bias = None
        if adapter.lora_B.bias is not None:  # PEFT's lora_bias: s·b_B joins the base layer's bias
            if self.bias is None:
                raise RuntimeError(f"cannot merge LoRA layer {self.module_path or '<unnamed>'}: its lora_B has a bias "
                                   "(lora_bias) but the base layer has none to merge it into (PEFT refuses too)")
            bias = self.bias.float() + adapter.lora_B.bias.float() * adapter.scaling
        if adapter.lora_magnitude_vector is None:
            return self.weight.float() + self.delta_weight(), bias, None
        magnitude = adapter.lora_magnitude_vector.float()
        weight, norm = dora_merged_weight(self.weight.float(), self.delta_weight(), magnitude)
        return weight, bias, norm

    @torch.no_grad()
    def merge(self):
        """Fold the active adapter's update into `weight` (in place) so inference costs one linear."""
        if self.merged:
            raise RuntimeError(f"LoRA layer {self.module_path or '<unnamed>'} is already merged")
        weight, bias, norm = self._merged()
        if not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(
                f"refusing to merge LoRA layer {self.module_path or '<unnamed>'}: the merged weight has "
                "non-finite values (NaN/inf in lora_A/lora_B, or an overflow in the base dtype). "
                "The weights are left unchanged."
            )
        self.weight.copy_(weight.to(self.weight.dtype))
        if bias is not None:
            self.bias.copy_(bias.to(self.bias.dtype))
        self.merged, self.merged_weight_norm = True, norm
        self.merged_adapter = self.active_adapter if self.adapter(self.active_adapter) is not None else None

    @torch.no_grad()
    def unmerge(self):
        """Take out the update merged by merge(); exact up to the rounding of `weight`'s dtype."""
        if not self.merged:
            raise RuntimeError(f"LoRA layer {self.module_path or '<unnamed>'} is not merged")
        if self.merged_adapter is not None:
            adapter, delta = self.adapter(self.merged_adapter), self.delta_weight(self.merged_adapter)
            if adapter.lora_magnitude_vector is None:
                weight = self.weight.float() - delta
            else:
                magnitude = adapter.lora_magnitude_vector.float()
                weight = dora_unmerged_weight(self.weight.float(), delta, magnitude, self.merged_weight_norm)
            self.weight.copy_(weight.to(self.weight.dtype))
            if adapter.lora_B.bias is not None:
                self.bias.copy_((self.bias.float() - adapter.lora_B.bias.float() * adapter.scaling).to(self.bias.dtype))
        self.merged, self.merged_adapter, self.merged_weight_norm = False, None, None

    def _adapter_or_raise(self, name: str | None) -> nn.Module:
        adapter = self.adapter(name)
        if adapter is None:
            where = self.module_path or "<unnamed>"
            raise KeyError(f"LoRA layer {where} has no adapter {name!r}; it has {self.adapter_names()}")
        return adapter

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, the default one first."""
        return list(self.lora_adapters)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters adapter `name` trains in this layer (none when the layer lacks it): lora_A, lora_B,
        lora_B's bias, DoRA's magnitude; never the base `weight`/`bias`."""
        adapter = self.adapter(name)
        return [] if adapter is None else list(adapter.parameters())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"active_adapter={self.active_adapter!r}, merged={self.merged}"
        )


class LinearWithLoRA(LinearWithAdapters):
    """y = x·Wᵀ + b + scaling · B(A(dropout(x))), around an nn.Linear whose `weight` and `bias`
    Parameters it keeps as its own; `lora_A` (in→r) and `lora_B` (r→out) are Linears, bias-free unless
    `lora_bias`. `init` picks how A and B start (lora/init.py). With use_dora=True, DoRA's magnitude
    `lora_magnitude_vector` (out,) rescales each output row (lora/dora.py).
    Over an NF4Linear, `weight` is its NF4Tensor (frozen 4-bit codes) and merge() refuses."""

    def __init__(self, base: nn.Linear | NF4Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 lora_bias: bool = False, init: str = "default", use_dora: bool = False):
        super().__init__(base)
        add_adapter_parts(self, self, r, alpha, dropout, rslora, lora_bias, use_dora)  # the default adapter: own parts
        initialise(self, init)  # "default" is reset_lora_parameters(); PiSSA/OLoRA also change `weight`
        self.reset_magnitude()  # after the init, as PEFT: DoRA's m = ||W + s·B@A||_c of the weights the init left

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def reset_lora_parameters(self):
        """A Kaiming-uniform (a=√5), B zeros, DoRA's m = ||W||_c: the layer computes the base layer bit for bit."""
        reset_adapter_parameters(self, self)

    def reset_magnitude(self):
        """Set DoRA's m = ||W + s·B@A||_c from the current W, A and B (nothing for plain LoRA): an init that
        changes W, A or B after construction must call it, since m is the norm of the weights training starts from."""
        if self.use_dora:
            init_magnitude(self, self.weight)

    def adapter(self, name: str | None) -> nn.Module | None:
        return self if name == DEFAULT_ADAPTER else super().adapter(name)

    def adapter_names(self) -> list[str]:
        return [DEFAULT_ADAPTER, *self.lora_adapters]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        # the default adapter's parts are this layer's own, beside the base weight and the named adapters
        if name == DEFAULT_ADAPTER:
            return [self.get_parameter(param) for param in self.adapter_params()]
        return super().adapter_parameters(name)

    def adapter_params(self) -> list[str]:
        """Names of this layer's trainable adapter parameters (torchtune's convention)."""
        bias = ["lora_B.bias"] if self.lora_B.bias is not None else []
        return ["lora_A.weight", "lora_B.weight", *bias] + (["lora_magnitude_vector"] if self.use_dora else [])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dora={self.use_dora}, merged={self.merged}"
            + (f", active={self.active_adapter!r}, named={list(self.lora_adapters)}" if self.lora_adapters else "")
        )
