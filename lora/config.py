"""What to adapt and how strongly: the one LoRA hyper-parameter record.

Target semantics are PEFT's for a string: each pattern must ``re.fullmatch`` a module's dotted
path (``audio_tower.layers.3.self_attn.q_proj``). Several patterns are OR-ed.
"""

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRAConfig:
    """Which Linear layers get LoRA (`targets`: one regex or a list, OR-ed, each fullmatched against
    the dotted module path) and how: rank `r`, scale `alpha`/r (alpha/sqrt(r) with `rslora`),
    dropout on the LoRA branch's input."""

    targets: str | list[str] | tuple[str, ...]  # regex(es) fullmatched against dotted module paths
    r: int = 8  # rank of the update B@A; the paper finds 4-16 enough for attention projections
    alpha: float = 16  # update scale numerator; alpha/r keeps the step size stable when r changes
    dropout: float = 0.0  # dropout on the LoRA branch's input only; the frozen path never drops
    rslora: bool = False  # scale alpha/sqrt(r) instead (Kalajdzievski 2023, "rank-stabilized LoRA")

    def __post_init__(self):
        if not self.patterns:
            raise ValueError("LoRAConfig.targets is empty: give at least one regex, e.g. '.*q_proj'")
        for pattern in self.patterns:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"LoRAConfig.targets holds {pattern!r}: every target must be a non-empty regex string")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"target pattern {pattern!r} is not a valid regular expression: {err}") from None
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def patterns(self) -> tuple[str, ...]:
        """The targets as a tuple of regexes, whether one string or a list was given."""
        return (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)

    @property
    def scaling(self) -> float:
        """The factor on B@A: alpha/r (Hu et al. 2021), or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def matches(self, module_path: str) -> bool:
        """True when any target pattern fullmatches the dotted module path (PEFT's rule for a string)."""
        return any(re.fullmatch(pattern, module_path) for pattern in self.patterns)
