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
   of an injected layer that ran instead of it.
Forward hooks observe the step (diagnosis only: the forward path itself has none). The model's
gradients, train/eval modes and the RNG state are restored afterwards.
"""

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from lora.inject import lora_layers
from lora.targets import compact_paths


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class DiagnosisReport:
    checks: list[Check] = field(default_factory=list)
    loss: float | None = None

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def add(self, name: str, ok: bool, detail: str):
        self.checks.append(Check(name, ok, detail))

    def __str__(self) -> str:
        lines = [f"LoRA gradient-flow diagnosis: {'healthy' if self.ok else 'PROBLEMS FOUND'}"]
        for number, check in enumerate(self.checks, 1):
            lines.append(f"  [{'ok' if check.ok else 'FAIL'}] {number}. {check.name}")
            lines += [f"         {line}" for line in check.detail.splitlines()]
        return "\n".join(lines)


def _listed(names, limit: int = 6) -> str:
    """Module paths folded (`layers.{0..31}.self_attn.{k,q,v}_proj`), then cut at `limit` entries."""
    names = list(names)
    folded = compact_paths(names)
    return ", ".join(folded[:limit]) + (f", ... ({len(names)} in all)" if len(folded) > limit else "")


def _by_child(paths) -> str:
    counts = Counter(path.split(".", 1)[0] for path in paths)
    return ", ".join(f"{n} in {child}" for child, n in counts.items())


def _tensors(value) -> list[torch.Tensor]:
    """The tensors of a hook's args or output: a tensor, or the tensors in a tuple/list."""
    if torch.is_tensor(value):
        return [value]
    return [v for v in value if torch.is_tensor(v)] if isinstance(value, (tuple, list)) else []


def _has_grad(value) -> bool:
    return any(t.requires_grad for t in _tensors(value))


def diagnose(model: nn.Module, step_fn) -> DiagnosisReport:
    """Run step_fn(model) once with observation hooks, backward, and check the seven points."""
    report = DiagnosisReport()
    layers = lora_layers(model)
    total = sum(p.numel() for p in model.parameters())
    report.add("LoRA layers are injected", bool(layers),
               f"{len(layers)} LoRA layers: {_by_child(layers)}" if layers else "no LinearWithLoRA in the model: call inject_lora first")
    if not layers:
        return report
    lora_params = {f"{path}.{name}": p for path, layer in layers.items() for name, p in (("lora_A.weight", layer.lora_A.weight), ("lora_B.weight", layer.lora_B.weight))}
    n_lora = sum(p.numel() for p in lora_params.values())
    report.add("LoRA parameters exist", n_lora > 0, f"{n_lora:,} parameters, {100 * n_lora / total:.4f}% of {total:,}")
    frozen = [name for name, p in lora_params.items() if not p.requires_grad]
    report.add("LoRA parameters require grad", not frozen,
               "all do" if not frozen else f"frozen: {_listed(frozen)}; call mark_only_lora_trainable(model) after any requires_grad_(False)")
    in_eval = [path for path, layer in layers.items() if not layer.training]
    report.add("LoRA layers are in train mode", not in_eval,
               "all are" if not in_eval else f"in eval mode: {_listed(in_eval)}; call model.train() after evaluating (dropout is off in eval mode)")

    path_of = {module: path for path, module in model.named_modules()}
    calls: list[tuple[str, bool, bool]] = []  # (module path, input requires grad, output requires grad), in call order
    handles = [m.register_forward_hook(lambda m, args, out: calls.append((path_of[m], _has_grad(args), _has_grad(out)))) for m in path_of]
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
        reach = f"called, but their outputs do not require grad (a torch.no_grad() or inference_mode around them): {_listed(lora_out_no_grad)}"
    else:
        reach = f"every LoRA layer ran ({min(ran[p] for p in layers)}-{max(ran[p] for p in layers)} calls each)"
    if not loss.requires_grad:
        reach += "\nthe loss does not require grad: a no_grad block or a .detach() cuts it off from every trainable parameter"
    report.add("the forward reaches every LoRA layer and the loss requires grad", not never and not lora_out_no_grad and loss.requires_grad, reach)

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
    report.add("LoRA sits where the forward runs", not placement, "\n".join(placement) or "every injected layer is on this task's forward path")
    return report


def placement_findings(model, layers, ran, calls) -> list[str]:
    """Explain never-called LoRA layers: an unused child, a plain copy that ran instead, or a detach."""
    findings = []
    never_by_child = defaultdict(list)
    for path in layers:
        if not ran[path]:
            never_by_child[path.split(".", 1)[0]].append(path)
    linear_ran = {path for path in ran if path not in layers and isinstance(model.get_submodule(path), nn.Linear)}
    for child, paths in never_by_child.items():
        # a plain Linear that ran at the same relative path under another child: an un-injected copy
        copies = sorted({p for p in linear_ran for q in paths if p.split(".", 1)[-1] == q.split(".", 1)[-1] and p.split(".", 1)[0] != child})
        if copies:
            findings.append(f"{len(paths)} LoRA layers in `{child}` never ran, but plain Linears at the same place under "
                            f"`{copies[0].split('.', 1)[0]}` did ({_listed(copies, 3)}): the forward reaches a second, "
                            "un-injected copy of the module; inject into the copy the forward uses, or route the forward through this one")
        elif not any(path == child or path.startswith(child + ".") for path in ran):
            findings.append(f"{len(paths)} LoRA layers in `{child}` never ran in this task's forward: your targets select modules "
                            "this task does not use; narrow --targets to the modules on the forward path")
        else:
            findings.append(f"{len(paths)} LoRA layers in `{child}` never ran although other parts of `{child}` did: {_listed(paths, 3)}")
    # a LoRA-holding child whose output required grad, followed by a consumer whose input did not: a detach between them
    carriers = {path.split(".", 1)[0] for path in layers}
    for i, (path, _, out) in enumerate(calls):
        if path in carriers and out:
            consumers = [c for c in calls[i + 1:] if c[0] and "." not in c[0] and c[0] != path]  # later top-level modules
            if consumers and not consumers[0][1]:
                findings.append(f"`{path}` returns a tensor that requires grad, but the next module called, `{consumers[0][0]}`, "
                                "receives one that does not: a .detach() (or no_grad) sits between them, so LoRA gets no gradient")
    return findings


def first_nonfinite_module(model: nn.Module, step_fn) -> str | None:
    """Re-run a step with hooks and name the first module (in call order) whose output holds NaN or
    inf while its inputs were finite: where the numbers went bad (or say that the input already
    was). None if the forward stays finite."""
    found: list[str] = []
    path_of = {module: path for path, module in model.named_modules() if path}

    def finite(value) -> bool:
        return all(torch.isfinite(t).all() for t in _tensors(value) if t.is_floating_point())

    def hook(module, args, out):
        if found:
            return
        if not finite(args):  # nothing before it went bad: the data itself is non-finite
            found.append(f"the input of {path_of[module]} ({type(module).__name__}): the batch itself holds NaN/inf")
        elif not finite(out):
            found.append(f"{path_of[module]} ({type(module).__name__})")

    handles = [m.register_forward_hook(hook) for m in path_of]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the re-run must not shift the training RNG
            loss = step_fn(model)
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return found[0]
    return None if math.isfinite(float(loss)) else "the loss computation itself (every module output was finite)"
