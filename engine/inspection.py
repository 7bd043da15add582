"""train.py's two looks before training: --list-targets (what the patterns select, and what that costs) and
--diagnose (the gradient-flow checks of lora/diagnose.py on one real batch, on the model as training holds it)."""

from torch.utils.data import DataLoader

from common.precision import Precision
from common.run_config import RunConfig
from engine.training import StepEnv, set_train_mode
from lora.config import LoRAConfig
from lora.diagnose import diagnose
from lora.targets import format_preview, preview_targets


def print_target_preview(task, config: RunConfig) -> int:
    """The modules each target selects (in the task's model, before injection), the trainable counts with the
    heads, and what the task's forward never runs; 0 when every pattern is usable, else 1."""
    targets = list(config.lora.targets)
    rank_for = LoRAConfig.from_settings(config.lora, dict(task.model.named_modules())).rank_for
    preview = preview_targets(task.model, targets, rank_for)
    also = task.heads + list(config.lora.train_also)
    heads = sum(p.numel() for n, p in task.model.named_parameters()
                if any(n == h or n.startswith(h + ".") for h in also))
    print(format_preview(preview, targets, extra_trainable=heads))
    strategy = task.forward_strategy(targets)
    if strategy is not None and strategy.misplaced:  # a pattern aimed at modules this strategy never loads
        print("\n".join(strategy.findings()))
        return 1
    return 0 if preview.ok else 1


def diagnose_one_batch(task, model, strategy, batch_size: int, precision: Precision, device) -> int:
    """The diagnosis report on the first readable batch of the training data; 0 when healthy, else 1."""
    set_train_mode(model)
    env = StepEnv(device, lambda: precision.autocast(device), lambda loss: loss.backward())
    task.prepare(env, print)
    loader = DataLoader(task.dataset, batch_size=min(batch_size, len(task.dataset)), collate_fn=task.collate)
    batch = next(b for b in loader if b["index"].numel())
    report = diagnose(model, lambda m: task.micro_batch_loss(m, batch, env), strategy)
    print(report)
    return 0 if report.ok else 1
