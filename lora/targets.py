"""Preview what a set of target patterns selects, before anything is injected or trained.

`preview_targets(model, patterns)` answers the questions people otherwise learn the hard way:
which Linear layers match (compactly: `audio_tower.layers.{0..31}.self_attn.{q,k,v}_proj`), how
many trainable parameters that makes and the memory they and their AdamW states take, which
alternatives of a pattern match nothing (`o_proj` where the encoder says `out_proj`), which
Linear layers sit beside the matched ones unmatched, and which matches are not Linear at all.

At train time the same findings become warnings (or, with --strict-targets, an error):

    warnings = check_target_alternatives(model, patterns)   # before (or after) inject_lora
    for finding in warnings.findings: finding.pattern, finding.alternative, finding.suggestion
    print(warnings.message)   # warning: 'o_proj' (an alternative of '...(q|k|v|o)_proj') matches no module; ...
"""

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from lora.inject import LORA_BASES
from lora.summary import counted_weights
from lora.layer import LinearWithLoRA

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")
_GROUP = re.compile(r"\(([^()]*\|[^()]*)\)")  # an innermost (a|b|c) group
BYTES_PER_TRAINED_FP32 = 16  # weight 4 + gradient 4 + AdamW's two moments 8


def compact_paths(paths: list[str]) -> list[str]:
    """Fold layer indices and sibling names: 64 paths -> ['audio_tower.layers.{0..31}.self_attn.{k,q}_proj']."""
    by_shape: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        numbers = _NUMBER.findall(path)
        by_shape[_NUMBER.sub("#", path)].append(numbers)
    folded: dict[tuple[str, str], set[str]] = defaultdict(set)
    for shape, number_lists in by_shape.items():
        columns = list(zip(*number_lists))
        text = shape
        for column in columns:
            values = sorted({int(n) for n in column})
            span = f"{values[0]}" if len(values) == 1 else (
                f"{{{values[0]}..{values[-1]}}}" if values == list(range(values[0], values[-1] + 1))
                else "{" + ",".join(map(str, values)) + "}")
            text = text.replace("#", span, 1)
        parent, _, leaf = text.rpartition(".")
        folded[(parent, leaf.split("_", 1)[1] if "_" in leaf else "")].add(leaf)
    lines = []
    for (parent, suffix), leaves in folded.items():
        if len(leaves) > 1 and suffix:
            heads = sorted(leaf[: -len(suffix) - 1] for leaf in leaves)
            leaf_text = "{" + ",".join(heads) + "}_" + suffix
        else:
            leaf_text = ",".join(sorted(leaves)) if len(leaves) == 1 else "{" + ",".join(sorted(leaves)) + "}"
        lines.append(f"{parent}.{leaf_text}" if parent else leaf_text)
    return lines


def _alternatives(pattern: str):
    """Yield (group match, alternative, before, after, single) for each alternative inside an
    (a|b|c) group: `before`/`after` are the letters around the group, so that before + alternative
    + after spells it as a name ('o' in '.*(q|k|v|o)_proj' -> 'o' + '_proj'), and `single` is the
    pattern with that alternative alone in its group."""
    for group in _GROUP.finditer(pattern):
        before = re.search(r"\w*$", pattern[: group.start()]).group(0)
        after = re.match(r"\w*", pattern[group.end():]).group(0)
        for alternative in group.group(1).split("|"):
            single = pattern[: group.start()] + "(" + alternative + ")" + pattern[group.end():]
            yield group, alternative, before, after, single


def _matches_any(pattern: str, paths) -> bool:
    try:
        return any(re.fullmatch(pattern, p) for p in paths)
    except re.error:  # a group cut out of a larger construct: not judged
        return True


def dead_alternatives(pattern: str, paths: list[str]) -> list[str]:
    """Alternatives inside (a|b|c) groups of `pattern` that, substituted alone, match no path,
    spelled with the word around the group: 'o' in '.*(q|k|v|o)_proj' comes back as 'o_proj'."""
    return [before + alternative + after for _, alternative, before, after, single in _alternatives(pattern)
            if not _matches_any(single, paths)]


@dataclass(frozen=True)
class DeadAlternative:
    """One alternative of a target pattern that selects nothing, and what was probably meant."""
    pattern: str  # as the user wrote it
    alternative: str  # spelled with the word around its group: 'o_proj'
    nearest: tuple[str, ...]  # existing Linear names closest to it, best first: ('out_proj',)
    fixed_pattern: str | None  # the pattern with the alternative replaced by nearest[0], if that selects it
    suggestion: str  # one sentence: where nearest[0] sits and the fixed pattern

    def __str__(self) -> str:
        return f"'{self.alternative}' (an alternative of '{self.pattern}') matches no module; {self.suggestion}"


@dataclass
class TargetWarnings:
    """Every dead alternative of a set of target patterns; empty (and falsy) when all select something."""
    findings: list[DeadAlternative] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.findings)

    @property
    def message(self) -> str:
        return self.format()

    def format(self, strict: bool = False) -> str:
        """One `warning:` line a finding; with strict=True `error:` lines and what to do."""
        level = "error" if strict else "warning"
        lines = [f"{level}: {finding}" for finding in self.findings]
        if strict and lines:
            lines.append("--strict-targets: every alternative of a target pattern must select a module; "
                         "fix or drop the alternatives above, or leave out --strict-targets to train without them")
        return "\n".join(lines)


def check_target_alternatives(model: nn.Module, patterns: list[str]) -> TargetWarnings:
    """The alternatives of `patterns` that select nothing in `model`, each with the nearest Linear
    name and a corrected pattern. Works before or after inject_lora. A pattern that selects nothing
    at all is left out: inject_lora refuses it with its own message."""
    modules = [p for p, _ in model.named_modules() if p and ".lora_" not in p]
    linear = [p for p, m in model.named_modules() if isinstance(m, (*LORA_BASES, LinearWithLoRA)) and ".lora_" not in p]
    selected = {p for p in linear if any(re.fullmatch(pattern, p) for pattern in patterns)}
    warnings = TargetWarnings()
    for pattern in patterns:
        if not any(re.fullmatch(pattern, p) for p in modules):
            continue
        matched = [p for p in linear if re.fullmatch(pattern, p)]
        for group, alternative, before, after, single in _alternatives(pattern):
            if not _matches_any(single, modules):
                warnings.findings.append(_explain(pattern, group, alternative, before, after, matched, linear,
                                                  selected))
    return warnings


def _explain(pattern, group, alternative, before, after, matched, linear, selected) -> DeadAlternative:
    """Name the Linear layer the alternative was probably meant to be: first the unselected ones
    beside what the pattern matched (out_proj beside q/k/v_proj), else any unselected Linear in the
    model with a similar name."""
    word = before + alternative + after
    parents = {p.rpartition(".")[0] for p in matched}
    beside = [p for p in linear if p.rpartition(".")[0] in parents and p not in selected]
    pool = beside or [p for p in linear if p not in selected]
    leaves = sorted({p.rpartition(".")[2] for p in pool})
    nearest = tuple(difflib.get_close_matches(word, leaves, n=3, cutoff=0.0 if beside else 0.5))
    if not nearest:
        return DeadAlternative(pattern, word, (), None,
                               "no unselected Linear layer has a similar name: drop it "
                               "(--list-targets shows the names)")
    name = nearest[0]
    with_name = [p for p in pool if p.rpartition(".")[2] == name]
    fixed = None
    if name.startswith(before) and name.endswith(after) and len(name) > len(before) + len(after):
        # 'out_proj' is '' + 'out' + '_proj' around the group: put 'out' where 'o' was
        replacement = name[len(before): len(name) - len(after)]
        kept = [replacement if a == alternative else a for a in group.group(1).split("|")]
        candidate = pattern[: group.start()] + "(" + "|".join(dict.fromkeys(kept)) + ")" + pattern[group.end():]
        if any(re.fullmatch(candidate, p) for p in with_name):
            fixed = candidate
    side = "beside the layers it matched" if beside else "the nearest Linear name in the model"
    suggestion = f"{side} is '{name}' ({compact_paths(with_name)[0]})"
    suggestion += f": did you mean '{fixed}'?" if fixed else "; see --list-targets"
    return DeadAlternative(pattern, word, nearest, fixed, suggestion)


@dataclass
class TargetPreview:
    matched: list[str] = field(default_factory=list)  # Linear paths that would get LoRA
    not_linear: dict[str, str] = field(default_factory=dict)  # matched path -> type name
    unmatched_patterns: list[str] = field(default_factory=list)
    dead: dict[str, list[str]] = field(default_factory=dict)  # pattern -> alternatives matching nothing
    siblings: list[str] = field(default_factory=list)  # unmatched Linear layers beside matched ones
    warnings: TargetWarnings = field(default_factory=TargetWarnings)  # the dead alternatives, explained
    lora_params: int = 0
    total_params: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.matched) and not self.not_linear and not self.unmatched_patterns


def preview_targets(model: nn.Module, patterns: list[str], r) -> TargetPreview:
    """What inject_lora(model, LoRAConfig(patterns, r=r)) would do, and what looks unintended. `r` is the rank,
    or a function of the module path giving each layer's (LoRAConfig.rank_for, for --rank-pattern)."""
    rank_for = r if callable(r) else (lambda path: r)
    modules = {p: m for p, m in model.named_modules() if p and ".lora_" not in p}
    linear = {p: m for p, m in modules.items() if isinstance(m, (*LORA_BASES, LinearWithLoRA))}
    preview = TargetPreview(total_params=sum(numel for _, numel, _ in counted_weights(model)))
    for path, module in modules.items():
        if any(re.fullmatch(pattern, path) for pattern in patterns):
            if path in linear:
                preview.matched.append(path)
                preview.lora_params += rank_for(path) * (module.in_features + module.out_features)
            else:
                preview.not_linear[path] = type(module).__name__
    preview.unmatched_patterns = [p for p in patterns if not any(re.fullmatch(p, path) for path in modules)]
    for pattern in patterns:
        dead = dead_alternatives(pattern, list(modules))
        if dead:
            preview.dead[pattern] = dead
    preview.warnings = check_target_alternatives(model, patterns)
    parents = {p.rpartition(".")[0] for p in preview.matched}
    preview.siblings = [p for p in linear if p.rpartition(".")[0] in parents and p not in preview.matched]
    return preview


def anchored(pattern: str) -> str:
    """'qformer.*(query|key|value)' -> 'qformer.*\\.(query|key|value)': a group must start a path component,
    so `intermediate_query` (ending in 'query') no longer matches."""
    return re.sub(r"\.\*\(", r".*\\.(", pattern)


def format_preview(preview: TargetPreview, patterns: list[str], extra_trainable: int = 0) -> str:
    quoted = ", ".join(f"'{p}'" for p in patterns)  # not repr: a user's backslashes must not double
    lines = [f"targets: {quoted}"]
    lines.append(f"matched {len(preview.matched)} Linear layers:")
    lines += [f"  {line}" for line in compact_paths(preview.matched)] or ["  (none)"]
    trained = preview.lora_params + extra_trainable
    lines.append(
        f"LoRA parameters: {preview.lora_params:,} "
        f"({100 * preview.lora_params / max(1, preview.total_params):.4f}% of the model's {preview.total_params:,})"
        + (f"; with the heads {trained:,} trainable" if extra_trainable else "")
    )
    lines.append(f"memory for them in fp32 with AdamW (weights, gradients, 2 moments): "
                 f"{trained * BYTES_PER_TRAINED_FP32 / 2**20:.1f} MiB")
    suggestions = {(f.pattern, f.alternative): f.suggestion for f in preview.warnings.findings}
    for pattern, alternatives in preview.dead.items():
        for name in alternatives:
            hint = f"; {suggestions[pattern, name]}" if (pattern, name) in suggestions else ""
            lines.append(f"note: '{name}' (an alternative of '{pattern}') exists nowhere in this model{hint}")
    if preview.siblings:
        lines.append("note: Linear layers beside the matched ones, left out by the targets "
                     "(did you mean one of these?):")
        lines += [f"  {line}" for line in compact_paths(preview.siblings)]
    for path, type_name in list(preview.not_linear.items())[:10]:
        lines.append(f"error: {path} matches but is a {type_name}, not a Linear")
    for pattern in patterns:
        if any(re.fullmatch(pattern, path) for path in preview.not_linear):
            hint = (f"try '{anchored(pattern)}'" if anchored(pattern) != pattern
                    else "end it at a dot-separated Linear name")
            lines.append(f"  '{pattern}' selects more than Linear layers: anchor it so a name must follow a dot; "
                         f"{hint}")
    for pattern in preview.unmatched_patterns:
        lines.append(f"error: '{pattern}' matches no module")
    return "\n".join(lines)
