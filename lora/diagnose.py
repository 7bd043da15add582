"""Why does my LoRA not learn? Seven checks on one real step, each naming what is wrong.

    report = diagnose(model, step_fn)      # step_fn(model) runs one forward, returns a scalar loss
    print(report); assert report.ok

The checks follow a careful manual diagnosis:
1. LoRA layers are injected (how many, under which top-level child);
2. their parameters exist (count, share of the model);
3. they require grad;
4. every LoRA layer is in train mode (dropout on; eval mode is a common slip after evaluation);
5. the forward reaches every LoRA layer, and the loss requires grad;
6. after backward, every LoRA parameter has a finite, non-zero gradient;
7. where LoRA sits against what ran: layers in a child the forward never used, or a plain copy
   of an injected layer that ran instead of it; with a `ForwardStrategy` (what a task's forward
   runs, e.g. Qwen2-Audio's tower alone), it is named, and target patterns that select only modules
   that forward never runs (not even built) are reported with the fix, even when nothing was injected:

    report = diagnose(model, step_fn, ForwardStrategy("audio_tower", "audio_tower -> pool -> audio_proj",
                                                      misplaced={pattern: [paths it selects]}, fix="..."))
Forward hooks observe the step (diagnosis only: the forward path itself has none). The model's
gradients, train/eval modes and the RNG state are restored afterwards.

When a training step goes NaN/inf, `blame_nonfinite` re-runs its forward with hooks and says where
the first non-finite value appeared:

    blame = blame_nonfinite(model, step_fn, {"features": batch["features"]})
    print(blame.message); bad_paths = [batch["paths"][row] for row in blame.rows]

- in the batch itself: the rows holding NaN/inf (`blame.rows`), so the loop can name the files;
- in a module's own computation (a Linear, a LayerNorm): that module;
- between modules, in a functional op of a parent's forward (softmax, GELU, a residual add, a
  division): "inside the forward of X, after its child Y", Y the last child that returned finite
  values, so X's child is not blamed for what X did with its output;
- in the step function, outside every module: the loss, or code between top-level calls.
"""

import dataclasses
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from lora.inject import LORA_BASES, lora_layers
from lora.summary import counted_weights
from lora.layer import LinearWithLoRA
from lora.targets import compact_paths


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    number: int = 0  # its place in the list of seven; 0: the next one


@dataclass
class DiagnosisReport:
    checks: list[Check] = field(default_factory=list)
    loss: float | None = None

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def add(self, name: str, ok: bool, detail: str, number: int = 0):
        self.checks.append(Check(name, ok, detail, number or len(self.checks) + 1))

    def __str__(self) -> str:
        lines = [f"LoRA gradient-flow diagnosis: {'healthy' if self.ok else 'PROBLEMS FOUND'}"]
        for check in self.checks:
            lines.append(f"  [{'ok' if check.ok else 'FAIL'}] {check.number}. {check.name}")
            lines += [f"         {line}" for line in check.detail.splitlines()]
        return "\n".join(lines)


@dataclass(frozen=True)
class ForwardStrategy:
    """What a task's forward runs, so check 7 can name it and catch targets it never reaches.

    `misplaced` maps each target pattern that selects *only* modules this forward never runs (and so
    never built: a language model left unloaded) to the paths it would select; `fix` says what to do."""

    name: str  # e.g. "audio_tower"
    path: str  # the forward in a line: "log-mel -> audio_tower -> mean over frames -> audio_proj"
    misplaced: dict[str, list[str]] = field(default_factory=dict)
    fix: str = ""

    def findings(self) -> list[str]:
        """One message per misplaced pattern, then the fix; empty when every target can run."""
        lines = []
        for pattern, paths in self.misplaced.items():
            children = sorted({path.split(".", 1)[0] for path in paths})
            lines.append(f"--targets '{pattern}' selects {len(paths)} Linear layers "
                         f"in {', '.join(f'`{c}`' for c in children)} "
                         f"({_listed(paths, 3)}), which the {self.name} strategy never runs "
                         "(they are not even loaded): "
                         "LoRA sits where the forward never runs")
        if lines and self.fix:
            lines.append(f"fix: {self.fix}")
        return lines


def _listed(names, limit: int = 6) -> str:
    """Module paths folded (`layers.{0..31}.self_attn.{k,q,v}_proj`), then cut at `limit` entries."""
    names = list(names)
    folded = compact_paths(names)
    return ", ".join(folded[:limit]) + (f", ... ({len(names)} in all)" if len(folded) > limit else "")


def _by_child(paths) -> str:
    counts = Counter(path.split(".", 1)[0] for path in paths)
    return ", ".join(f"{n} in {child}" for child, n in counts.items())


def _tensors(value) -> list[torch.Tensor]:
    """The tensors of a hook's args, kwargs or output: a tensor, or those inside tuples, lists,
    dicts and dataclasses (a model's output object), at any depth."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    return []


def _has_grad(value) -> bool:
    return any(t.requires_grad for t in _tensors(value))


def diagnose(model: nn.Module, step_fn, strategy: ForwardStrategy | None = None) -> DiagnosisReport:
    """Run step_fn(model) once with observation hooks, backward, and check the seven points. `strategy`
    (optional) names what the task's forward runs; check 7 then also reports its misplaced targets."""
    report = DiagnosisReport()
    layers = lora_layers(model)
    total = sum(numel for _, numel, _ in counted_weights(model))  # NF4 weights too
    unplaced = strategy is not None and strategy.misplaced
    report.add("LoRA layers are injected", bool(layers),
               f"{len(layers)} LoRA layers: {_by_child(layers)}" if layers else
               "no LinearWithLoRA in the model: "
               + ("every target selects modules the strategy never loads (check 7)" if unplaced
                  else "call inject_lora first"))
    if not layers:
        if unplaced:  # nothing could be injected where the targets point: say why
            report.add("LoRA sits where the forward runs", False, "\n".join(_strategy_lines(strategy, [])), number=7)
        return report
    lora_params = {f"{path}.{name}": layer.get_parameter(name)
                   for path, layer in layers.items() for name in layer.adapter_params()}
    n_lora = sum(p.numel() for p in lora_params.values())
    report.add("LoRA parameters exist", n_lora > 0, f"{n_lora:,} parameters, {100 * n_lora / total:.4f}% of {total:,}")
    frozen = [name for name, p in lora_params.items() if not p.requires_grad]
    report.add("LoRA parameters require grad", not frozen,
               "all do" if not frozen else f"frozen: {_listed(frozen)}; "
               "call mark_only_lora_trainable(model) after any requires_grad_(False)")
    in_eval = [path for path, layer in layers.items() if not layer.training]
    report.add("LoRA layers are in train mode", not in_eval,
               "all are" if not in_eval else f"in eval mode: {_listed(in_eval)}; "
               "call model.train() after evaluating (dropout is off in eval mode)")

    path_of = {module: path for path, module in model.named_modules()}
    calls: list[tuple[str, bool, bool]] = []  # (module path, input requires grad, output requires grad), in call order
    handles = [m.register_forward_hook(lambda m, args, out: calls.append((path_of[m], _has_grad(args), _has_grad(out))))
               for m in path_of]
    saved_grads = {p: p.grad for p in model.parameters()}
    saved_modes = {m: m.training for m in model.modules()}
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        try:
            for p in model.parameters():
                p.grad = None
            loss = step_fn(model)
            if loss.requires_grad:
                loss.backward()
            grads = {name: p.grad for name, p in lora_params.items()}
        finally:
            for handle in handles:
                handle.remove()
            for p, grad in saved_grads.items():
                p.grad = grad
            for m, mode in saved_modes.items():
                m.train(mode)
    report.loss = float(loss.detach())

    ran = Counter(path for path, _, _ in calls)
    never = [path for path in layers if not ran[path]]
    lora_out_no_grad = sorted({path for path, _, out in calls if path in layers and not out})
    if never:
        reach = f"never called: {_listed(never)}"
    elif lora_out_no_grad:
        reach = (f"called, but their outputs do not require grad (a torch.no_grad() or inference_mode around them): "
                 f"{_listed(lora_out_no_grad)}")
    else:
        reach = f"every LoRA layer ran ({min(ran[p] for p in layers)}-{max(ran[p] for p in layers)} calls each)"
    if not loss.requires_grad:
        reach += ("\nthe loss does not require grad: a no_grad block or a .detach() cuts it off from every trainable "
                  "parameter")
    report.add("the forward reaches every LoRA layer and the loss requires grad",
               not never and not lora_out_no_grad and loss.requires_grad, reach)

    bad = defaultdict(list)  # what is wrong -> parameter names
    for name, grad in grads.items():
        if grad is None:
            bad["no gradient"].append(name)
        elif not torch.isfinite(grad).all():
            bad["non-finite gradient"].append(name)
        elif name.endswith("lora_B.weight") and grad.abs().sum() == 0:
            bad["zero gradient"].append(name)
    # lora_A's gradient is B^T @ (...): exactly zero while B is still at its zero init; that is expected
    detail = "\n".join(
        f"{what} ({len(names)} parameters): {_listed(sorted({n.rsplit('.', 2)[0] for n in names}))}"
        f" ({', '.join(sorted({n.rsplit('.', 2)[1] for n in names}))})"
        for what, names in bad.items()
    )
    report.add("every LoRA parameter gets a finite, non-zero gradient", not bad,
               detail or "all do (lora_A stays at zero gradient only while lora_B is still zero)")

    placement = placement_findings(model, layers, ran, calls)
    if strategy is None:
        lines, ok = placement or ["every injected layer is on this task's forward path"], not placement
    else:
        lines, ok = _strategy_lines(strategy, placement), not placement and not strategy.misplaced
    report.add("LoRA sits where the forward runs", ok, "\n".join(lines))
    return report


def _strategy_lines(strategy: ForwardStrategy, placement: list[str]) -> list[str]:
    """Check 7's lines under a named strategy: what it runs, then every finding (or that there is none)."""
    findings = placement + strategy.findings()
    return [f"encoding strategy {strategy.name}: {strategy.path}"] + (
        findings or ["every injected layer is on this forward path"])


def placement_findings(model, layers, ran, calls) -> list[str]:
    """Explain never-called LoRA layers: an unused child, a plain copy that ran instead, or a detach."""
    findings = []
    never_by_child = defaultdict(list)
    for path in layers:
        if not ran[path]:
            never_by_child[path.split(".", 1)[0]].append(path)
    linear_ran = {path for path in ran if path not in layers and isinstance(model.get_submodule(path), LORA_BASES)}
    for child, paths in never_by_child.items():
        # a plain Linear that ran at the same relative path under another child: an un-injected copy
        copies = sorted({p for p in linear_ran for q in paths
                         if p.split(".", 1)[-1] == q.split(".", 1)[-1] and p.split(".", 1)[0] != child})
        if copies:
            findings.append(f"{len(paths)} LoRA layers in `{child}` never ran, but plain Linears at the same place "
                            f"under `{copies[0].split('.', 1)[0]}` did ({_listed(copies, 3)}): the forward reaches a "
                            "second, un-injected copy of the module; inject into the copy the forward uses, or route "
                            "the forward through this one")
        elif not any(path == child or path.startswith(child + ".") for path in ran):
            findings.append(f"{len(paths)} LoRA layers in `{child}` never ran in this task's forward: your targets "
                            "select modules this task does not use; narrow --targets to the modules on the forward "
                            "path")
        else:
            findings.append(f"{len(paths)} LoRA layers in `{child}` never ran although other parts of `{child}` did: "
                            f"{_listed(paths, 3)}")
    # a LoRA-holding child whose output required grad, followed by a consumer whose input did not:
    # a detach between them
    carriers = {path.split(".", 1)[0] for path in layers}
    for i, (path, _, out) in enumerate(calls):
        if path in carriers and out:
            # later top-level modules
            consumers = [c for c in calls[i + 1:] if c[0] and "." not in c[0] and c[0] != path]
            if consumers and not consumers[0][1]:
                findings.append(f"`{path}` returns a tensor that requires grad, but the next module called, "
                                f"`{consumers[0][0]}`, receives one that does not: a .detach() (or no_grad) sits "
                                "between them, so LoRA gets no gradient")
    return findings


@dataclass
class Blame:
    """Where the first NaN/inf of a step appeared (see the module docstring)."""
    kind: str  # "batch", "module", "inside", "step", "loss" or "finite" (the re-run stayed finite)
    message: str
    rows: list[int] = field(default_factory=list)  # batch rows holding NaN/inf (kind "batch")
    module: str | None = None  # the module blamed, or inside whose forward it happened ("" = the model)
    after: str | None = None  # the last child of `module` that returned finite values

    @property
    def found(self) -> bool:
        return self.kind != "finite"


def _label(path: str, module: nn.Module) -> str:
    return f"{path} ({type(module).__name__})" if path else f"the model ({type(module).__name__})"


def _finite(value) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(value) if t.is_floating_point())


def nonfinite_rows(tensor: torch.Tensor) -> list[int]:
    """Indices along dim 0 (the batch) of the rows holding NaN or inf."""
    if not tensor.is_floating_point() or tensor.dim() == 0:
        return []
    return torch.nonzero(~torch.isfinite(tensor).reshape(len(tensor), -1).all(dim=1)).flatten().tolist()


def _rows_text(rows: list[int]) -> str:
    return ("row " if len(rows) == 1 else "rows ") + ", ".join(map(str, rows))


def blame_nonfinite(model: nn.Module, step_fn, batch_tensors: dict[str, torch.Tensor] | None = None) -> Blame:
    """Find the first NaN/inf of step_fn(model) (which returns the loss).

    `batch_tensors` are the batch's input tensors by name, first dimension the batch: rows holding
    NaN/inf there are blamed without running anything. Otherwise the forward is re-run under
    no_grad with a pre- and a post-hook on every module (the model itself included), keeping a
    stack of the calls in progress; the first hook that sees a non-finite value decides:
    - a module's input is non-finite: whoever called it made it, i.e. the forward of the module
      on top of the stack after its last finished child, or at the top level the batch (nothing
      ran yet) or the step function (after the last top-level module);
    - a module's output is non-finite while its inputs and every child's output were finite: the
      module itself if it called no child, else its own forward after its last child.
    The RNG states (CPU and the current CUDA device) are restored, so training draws the same
    numbers as without the re-run; dropout in the re-run may differ from the failed step's."""
    bad = {name: rows for name, t in (batch_tensors or {}).items()
           if torch.is_tensor(t) and (rows := nonfinite_rows(t))}
    if bad:
        rows = sorted({row for name_rows in bad.values() for row in name_rows})
        where = "; ".join(f"{name!r} {_rows_text(name_rows)}" for name, name_rows in bad.items())
        return Blame("batch", f"the batch itself holds NaN/inf in {_rows_text(rows)} ({where})", rows)

    path_of = {module: path for path, module in model.named_modules()}
    stack: list[dict] = []  # calls in progress: {"path", "label", "last_child", "called_children"}
    top = {"last": None}  # the last top-level call that returned finite values
    found: list[Blame] = []

    def blame_input(module, inputs):
        label = _label(path_of[module], module)
        if stack:
            parent = stack[-1]
            after = (f"after its child {parent['last_child']}" if parent["last_child"]
                     else "before any of its children returned")
            return Blame("inside", f"inside the forward of {parent['label']}, {after}: an operation between modules "
                         "there (softmax, GELU, a residual add, a division, ...) "
                         f"made the NaN/inf that reaches {label}",
                         module=parent["path"], after=parent["last_child"])
        if top["last"] is not None:
            return Blame("step", f"in the step function, outside every module, after {top['last']} returned finite "
                         f"values: the input of {label} holds NaN/inf", after=top["last"])
        first_bad = next(t for t in _tensors(inputs) if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        rows = nonfinite_rows(first_bad)
        if batch_tensors:  # the given batch is clean: the step function's code before the model made it
            return Blame("step", f"the input of {label} holds NaN/inf ({_rows_text(rows)}) although the batch tensors "
                         f"({', '.join(batch_tensors)}) are finite: the step function made it before calling the model",
                         rows)
        return Blame("batch", f"the batch itself holds NaN/inf: the input of {label}, {_rows_text(rows)}", rows,
                     module=path_of[module])

    def pre_hook(module, args, kwargs):
        if not found and not _finite((args, kwargs)):
            found.append(blame_input(module, (args, kwargs)))
        stack.append({"path": path_of[module], "label": _label(path_of[module], module), "last_child": None,
                      "called_children": False})

    def post_hook(module, args, output):
        frame = stack.pop()
        if stack:
            stack[-1]["called_children"] = True
        if found:
            return
        if not _finite(output):
            # a LoRA layer is one Linear to the reader: its base matmul is not "between modules"
            if frame["called_children"] and not isinstance(module, LinearWithLoRA):
                found.append(Blame("inside", f"inside the forward of {frame['label']}, "
                                   f"after its child {frame['last_child']}: "
                                   "an operation between modules there (softmax, GELU, a residual add, a division, "
                                   "...) made the first NaN/inf", module=frame["path"], after=frame["last_child"]))
            else:
                found.append(Blame("module", frame["label"], module=frame["path"]))
        elif stack:
            stack[-1]["last_child"] = frame["path"]
        else:
            top["last"] = frame["label"]

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in path_of]
    handles += [m.register_forward_hook(post_hook) for m in path_of]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the re-run must not shift the training RNG
            loss = step_fn(model)
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return found[0]
    value = float(loss)
    if not math.isfinite(value):
        return Blame("loss", "the loss computation itself (every module output was finite)")
    return Blame("finite", f"the forward re-run is finite (loss {value:.4g}): the NaN/inf arise in the backward pass, "
                 "or depend on randomness such as dropout")


def first_nonfinite_module(model: nn.Module, step_fn) -> str | None:
    """blame_nonfinite(model, step_fn).message, or None if the forward stays finite."""
    blame = blame_nonfinite(model, step_fn)
    return blame.message if blame.found else None
