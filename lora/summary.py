"""Where the trainable parameters sit: the first thing to check when memory or learning surprises you."""

from dataclasses import dataclass, field

from torch import nn

from lora.inject import lora_layers
from lora.quant import NF4Tensor


@dataclass
class TrainableSummary:
    trainable: int  # parameters with requires_grad
    total: int  # all parameters (shared ones counted once)
    lora_layers: int  # LinearWithLoRA modules in the model
    by_child: dict[str, tuple[int, int]] = field(default_factory=dict)  # top-level child -> (trainable, total)

    @property
    def share(self) -> float:
        """Trainable fraction of all parameters."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.share:.4f}%), "
                 f"{self.lora_layers} LoRA layers"]
        width = max((len(name) for name in self.by_child), default=0)
        for name, (trainable, total) in self.by_child.items():
            lines.append(f"  {name:<{width}}  {trainable:>12,} / {total:>14,} trainable")
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable and total parameters, in all and per top-level child module.

    A parameter registered on the model itself (e.g. a `logit_scale`) is its own row.
    """
    by_child: dict[str, tuple[int, int]] = {}
    trainable = total = 0
    for name, numel, requires_grad in counted_weights(model):
        child = name.split(".", 1)[0]
        t, n = by_child.get(child, (0, 0))
        grad = numel if requires_grad else 0
        by_child[child] = (t + grad, n + numel)
        trainable += grad
        total += numel
    return TrainableSummary(trainable, total, len(lora_layers(model)), by_child)


def counted_weights(model: nn.Module):
    """(name, numel, requires_grad) of every parameter, and of every NF4 weight (--quantize nf4), which
    holds its parameters as packed buffers: a quantized model still has as many weights as before."""
    for name, param in model.named_parameters():  # named_parameters yields a shared tensor once
        yield name, param.numel(), param.requires_grad
    for name, module in model.named_modules():
        if isinstance(module, NF4Tensor):
            yield name, module.shape.numel(), False


def lora_placement(model: nn.Module) -> str:
    """One line that verifies where LoRA sits, e.g. 'LoRA: 2,359,296 parameters, 0.06% of the model,
    in 96 layers, all inside qformer' — a pattern that spread into a language model shows here."""
    layers = lora_layers(model)
    n_lora = sum(layer.get_parameter(name).numel() for layer in layers.values() for name in layer.adapter_params())
    total = sum(numel for _, numel, _ in counted_weights(model))
    children: dict[str, int] = {}
    for path in layers:
        children[path.split(".", 1)[0]] = children.get(path.split(".", 1)[0], 0) + 1
    where = f"all inside {next(iter(children))}" if len(children) == 1 else "inside " + ", ".join(
        f"{c} ({n} layers)" for c, n in children.items())
    return (f"LoRA: {n_lora:,} parameters, {100 * n_lora / max(1, total):.2f}% of the model, "
            f"in {len(layers)} layers, {where}")
