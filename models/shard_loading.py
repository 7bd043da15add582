"""Load a module shard by shard, optionally replacing frozen Linear layers as their weights arrive.

`models/checkpoint.py` `load_into` adopts a whole state dict at once. For a 7B language model in
16 bits that dict is 15 GB; with QLoRA the point is never to hold it: each Linear weight is
quantized to NF4 (lora/quant.py, about 0.53 bytes a parameter) the moment it is read, and the
16-bit tensor is dropped before the next group of tensors is read. So the peak while loading is the
quantized model plus one group (STREAM_GROUP_BYTES), not the 16-bit model, nor even one 4 GB shard.

    model = LlamaForCausalLM(cfg) on the meta device       # names and shapes, no memory
    for group in checkpoint.iter_prefix("language_model.", bf16, STREAM_GROUP_BYTES):
        key -> Linear weight to quantize?  replace that meta nn.Linear by replace(path, linear, weight)
               anything else               adopt the tensor (assign), as load_state_dict(assign=True)
    check: every key seen once, shapes equal, nothing left on meta

The checks are load_into's (missing, unexpected, mis-shaped keys, named); they run at the end,
since the tensors arrive a group at a time.
"""

from dataclasses import dataclass, replace as with_fields
from typing import Callable

import torch
from torch import nn

from lora.quant import NF4Linear, quantize_nf4
from models.checkpoint import Checkpoint, finish_loading, load_into, refuse_key_problems, resolve_dtype

# Tensors read at a time while quantizing (Checkpoint.iter_prefix's group_bytes): the 16-bit weights alive at once
# are at most this much plus one tensor (the largest: an embedding, 1.28 GB at Qwen2-Audio-7B, which is kept).
STREAM_GROUP_BYTES = 256 * 2**20
# (module path, the meta nn.Linear, its weight as read) -> the module to put there, or None to load it as is
ReplaceLinear = Callable[[str, nn.Linear, torch.Tensor], nn.Module | None]


@dataclass(frozen=True)
class Quantize:
    """Which Linear layers a loader holds in NF4 (`--quantize nf4`): every nn.Linear of the model except
    those at or under a `keep` path (the trainable heads, the output head). `base` is the model path of
    the module being loaded (e.g. 'language_model.'), so `keep` names full model paths."""

    keep: tuple[str, ...] = ()
    blocksize: int = 64
    base: str = ""

    @classmethod
    def of_run(cls, settings) -> "Quantize | None":
        """The quantization a run was trained with (its config's `model` section: quantize, quantize_keep), to
        rebuild the same model: the LoRA weights were trained over those NF4 weights, not the 16-bit ones."""
        if settings.quantize == "none":
            return None
        if settings.quantize != "nf4":
            raise ValueError(f"run_config.json: unknown quantize {settings.quantize!r} "
                             "(this toolkit knows 'none' and 'nf4')")
        return cls(keep=tuple(settings.quantize_keep))

    def under(self, path: str) -> "Quantize":
        """The same policy for the submodule at model path `path` (loaded on its own)."""
        return with_fields(self, base=self.base + path)

    def keeping(self, path: str) -> "Quantize":
        """The same policy, with the module at `path` (under `base`) kept in its 16-bit dtype too."""
        return with_fields(self, keep=self.keep + (self.base + path,))

    def kept(self, path: str) -> bool:
        full = self.base + path
        return any(full == k or full.startswith(k + ".") for k in self.keep)

    def replacer(self) -> ReplaceLinear:
        """For load_streaming: the NF4Linear of each Linear not kept, quantized from the weight just read
        (the 16-bit tensor is dropped with the shard); its bias slot is filled when its key arrives."""
        def replace(path: str, linear: nn.Linear, weight: torch.Tensor) -> nn.Module | None:
            if self.kept(path):
                return None
            return NF4Linear(quantize_nf4(weight, self.blocksize, double_quant=True, name=self.base + path),
                             linear.bias)
        return replace


def load_streaming(module: nn.Module, shards, source: str, replace: ReplaceLinear | None = None,
                   skip: Callable[[str], bool] | None = None) -> nn.Module:
    """Adopt the tensors of `shards` (an iterable of {key: tensor} dicts, e.g. Checkpoint.iter_prefix)
    into `module`, built on the meta device; `replace` may swap a Linear for another module as its weight
    arrives (its bias, in whatever shard, then lands on the new module); keys with skip(key) are dropped.
    Raises ValueError naming `source` and the keys at fault, as load_into does."""
    expected = {key: tensor.shape for key, tensor in module.state_dict().items()}  # on meta: no memory
    seen, unexpected, mismatched = set(), [], []
    for shard in shards:
        # A tensor read through a memory map is a view of the file's mapped pages, and keeps the whole mapping (every
        # page its group touched) resident while it lives. So when Linears are being replaced, what is adopted from
        # a group of several tensors is copied, and the group's mapping goes once its weights are quantized; a tensor
        # read alone (an embedding, as large as a group) is adopted as read: a copy would only double it for a moment.
        copy = replace is not None and len(shard) > 1
        for key in list(shard):
            tensor = shard.pop(key)  # the shard's dict lets go of each tensor once it is placed
            if skip is not None and skip(key):
                continue
            if key not in expected:
                unexpected.append(key)
                continue
            seen.add(key)
            if tensor.shape != expected[key]:
                mismatched.append(f"{key} (module {tuple(expected[key])}, checkpoint {tuple(tensor.shape)})")
                continue
            path, _, name = key.rpartition(".")
            owner = module.get_submodule(path)
            if replace is not None and name == "weight" and type(owner) is nn.Linear:
                replacement = replace(path, owner, tensor)
                if replacement is not None:
                    module.set_submodule(path, replacement)
                    continue
            adopt(owner, name, tensor.clone() if copy else tensor)
    refuse_key_problems(module, source, sorted(set(expected) - seen), sorted(unexpected), mismatched)
    return finish_loading(module, source)


def load_weights(module: nn.Module, checkpoint: Checkpoint, prefix: str, dtype, quantize: Quantize | None,
                 skip=None) -> nn.Module:
    """The tensors under `prefix` into `module` (built on meta), strictly. With `quantize`, streamed a group of
    tensors at a time, each Linear weight held in NF4 as it is read (models/shard_loading.py), so even a tower
    never sits in memory whole in 16 or 32 bits."""
    source = f"{checkpoint.source} [{prefix or '(no prefix)'}*]"
    if quantize is not None:
        groups = checkpoint.iter_prefix(prefix, resolve_dtype(dtype) if dtype is not None else None, STREAM_GROUP_BYTES)
        return load_streaming(module, groups, source, replace=quantize.replacer(), skip=skip)
    state = checkpoint.load_prefix(prefix, resolve_dtype(dtype) if dtype is not None else None)
    return load_into(module, {k: v for k, v in state.items() if skip is None or not skip(k)}, source)


def adopt(owner: nn.Module, name: str, tensor: torch.Tensor):
    """Put `tensor` in place of owner's parameter or buffer `name` (keeping requires_grad), no copy."""
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=owner._parameters[name].requires_grad)
    else:
        owner._buffers[name] = tensor


def quantize_linears(module: nn.Module, quantize: Quantize) -> nn.Module:
    """Replace, one at a time, every nn.Linear of a loaded `module` that `quantize` does not keep by its
    NF4Linear: for the towers, small enough to load whole first (the language model streams instead)."""
    if type(module) is nn.Linear:  # set_submodule cannot replace the root: quantize it from its parent instead
        raise ValueError(f"quantize_linears got a bare Linear ({quantize.base or 'the root'}); "
                         "pass the module holding it")
    paths = [path for path, m in module.named_modules() if type(m) is nn.Linear and not quantize.kept(path)]
    replace = quantize.replacer()
    for path in paths:
        linear = module.get_submodule(path)
        module.set_submodule(path, replace(path, linear, linear.weight.detach()))
    return module
