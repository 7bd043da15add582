"""What to adapt and how strongly: the one LoRA hyper-parameter record.

Target semantics are PEFT's for a string: each pattern must ``re.fullmatch`` a module's dotted
path (``audio_tower.layers.3.self_attn.q_proj``). Several patterns are OR-ed.

Per-module rank and alpha are PEFT's `rank_pattern` / `alpha_pattern` (peft/utils/other.py
`get_pattern_key`): a key applies to a module when ``re.match(rf"(.*\\.)?({key})$", path)``, i.e. the
key, read as a regex, matches a dot-separated *tail* of the path (``"q_proj"`` selects
``layers.0.self_attn.q_proj``; ``"^layers\\.0\\..*"`` only the layers under ``layers.0``). The first
key in the mapping's order that matches wins, the others are not looked at; no key -> `r` / `alpha`.
Order matters only for overlapping keys, and PEFT writes adapter_config.json with sorted keys, so
an overlapping pair can mean something else after PEFT saved it: we read files in their own order,
as PEFT does, and write ours in the config's order.
"""

import math
import re
from dataclasses import dataclass, field

# PEFT's `init_lora_weights` values implemented here (lora/init.py); True in PEFT is "default".
INITS = ("default", "gaussian", "pissa", "olora")  # and "pissa_niter_<N>"
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def pattern_key(keys, module_path: str) -> str | None:
    """The first key that applies to `module_path` under PEFT's rule (a regex matching a dotted tail), or None."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


@dataclass(frozen=True)
class LoRAConfig:
    """Which Linear layers get LoRA (`targets`: one regex or a list, OR-ed, each fullmatched against
    the dotted module path) and how: rank `r`, scale `alpha`/r (alpha/sqrt(r) with `rslora`),
    dropout on the LoRA branch's input, per-module exceptions to r and alpha, a bias on lora_B, the
    initialisation, and the modules trained fully beside LoRA (PEFT's modules_to_save)."""

    targets: str | list[str] | tuple[str, ...]  # regex(es) fullmatched against dotted module paths
    r: int = 8  # rank of the update B@A; the paper finds 4-16 enough for attention projections
    alpha: float = 16  # update scale numerator; alpha/r keeps the step size stable when r changes
    dropout: float = 0.0  # dropout on the LoRA branch's input only; the frozen path never drops
    rslora: bool = False  # scale alpha/sqrt(r) instead (Kalajdzievski 2023, "rank-stabilized LoRA")
    # {regex: rank} / {regex: alpha}: PEFT's rank_pattern / alpha_pattern (module docstring for the rule)
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    lora_bias: bool = False  # PEFT's lora_bias: lora_B gets a bias, scaled like B@A, merged into the base bias
    # "default" (A Kaiming-uniform, B 0), "gaussian", "pissa", "pissa_niter_<N>", "olora": lora/init.py
    init: str = "default"
    # modules (dotted paths) trained fully and saved in the adapter file, as PEFT's modules_to_save
    modules_to_save: tuple[str, ...] = ()
    use_dora: bool = False  # DoRA (Liu et al. 2024): a trainable magnitude per output row on top of LoRA (lora/dora.py)

    @classmethod
    def from_settings(cls, settings, module_names, targets=None) -> "LoRAConfig":
        """The LoRA of a run's settings (common/run_config.py LoRASettings): rank, alpha, dropout, rsLoRA, DoRA,
        per-module ranks and alphas, init, and the --train-also names that are modules of the model
        (`module_names`): PEFT's modules_to_save, so PEFT loads them with the adapter. `targets` overrides
        the settings' own."""
        return cls(list(settings.targets if targets is None else targets), r=settings.rank, alpha=settings.alpha,
                   dropout=settings.dropout, rslora=settings.rslora, use_dora=settings.dora,
                   rank_pattern=dict(settings.rank_pattern), alpha_pattern=dict(settings.alpha_pattern),
                   init=settings.init,
                   modules_to_save=tuple(name for name in settings.train_also if name in module_names))

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
        if not _is_rank(self.r):
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        # copies, so a caller changing its dict afterwards cannot change a config that is meant to be fixed
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        for name, mapping, valid, what in (("rank_pattern", self.rank_pattern, _is_rank, "a positive integer rank"),
                                           ("alpha_pattern", self.alpha_pattern, _is_number, "a number")):
            for key, value in mapping.items():
                try:
                    re.compile(rf"(.*\.)?({key})$")
                except (re.error, TypeError) as err:
                    raise ValueError(f"{name} key {key!r} is not a valid regular expression: {err}") from None
                if not valid(value):
                    raise ValueError(f"{name}[{key!r}] is {value!r}; it must be {what}")
        if self.init not in INITS and not _PISSA_NITER.fullmatch(str(self.init)):
            raise ValueError(f"LoRA init {self.init!r} is not one of {', '.join(INITS)}, "
                             "pissa_niter_<N> (N subspace iterations)")
        for name in self.modules_to_save:
            if not isinstance(name, str) or not name:
                raise ValueError(f"modules_to_save holds {name!r}: give dotted module paths, "
                                 "e.g. 'language_projection'")

    @property
    def patterns(self) -> tuple[str, ...]:
        """The targets as a tuple of regexes, whether one string or a list was given."""
        return (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)

    @property
    def scaling(self) -> float:
        """The factor on B@A: alpha/r (Hu et al. 2021), or alpha/sqrt(r) with rsLoRA. Per module: scaling_for."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def rank_for(self, module_path: str) -> int:
        """The rank of the module's LoRA: its rank_pattern entry, else r."""
        key = pattern_key(self.rank_pattern, module_path)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module_path: str) -> float:
        """The alpha of the module's LoRA: its alpha_pattern entry, else alpha."""
        key = pattern_key(self.alpha_pattern, module_path)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, module_path: str) -> float:
        """The factor on the module's B@A, from its own rank and alpha."""
        r, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    @property
    def pissa_niter(self) -> int | None:
        """N for init "pissa_niter_N" (randomised SVD with N subspace iterations), else None."""
        match = _PISSA_NITER.fullmatch(self.init)
        return int(match[1]) if match else None

    def matches(self, module_path: str) -> bool:
        """True when any target pattern fullmatches the dotted module path (PEFT's rule for a string)."""
        return any(re.fullmatch(pattern, module_path) for pattern in self.patterns)


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
