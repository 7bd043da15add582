"""What a run reports as it goes: metrics.jsonl (one JSON object per logged step and per evaluation), the
dashboards users already watch (--report-to tensorboard: event files under the output folder; wandb: an
offline run), the training curves as a PNG at the end, and the lines printed to the terminal. Only rank 0
writes. Every record goes to metrics.jsonl and to each dashboard alike."""

import json
from pathlib import Path

from tqdm import tqdm

from common.atomic import atomic_write, atomic_write_text
from common.errors import UserError
from common.run_files import CURVES_FILE, SKIPPED_FILE, STATE_FILE
from engine.training import LaunchedStep
from lora import trainable_summary
from lora.quant import NF4Linear, nf4_bytes
from lora.summary import lora_placement


REPORTERS = ("tensorboard", "wandb")  # the --report-to choices; metrics.jsonl and the PNG are always written
STEP_SCALARS = ("loss", "lr", "grad_norm", "examples_per_s", "data_wait_s", "padding", "lm_padding")


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as dashboard scalars: train/<name> for a step, eval/<path> for every number of an
    evaluation (nested metrics joined with '/': eval/text_to_audio/R@1); samples and texts are left out."""
    if "eval" in record:
        flat = {}

        def walk(prefix, value):
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}/{key}", item)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[prefix] = float(value)

        walk("eval", record["eval"])
        return flat
    return {f"train/{name}": float(record[name]) for name in STEP_SCALARS if name in record}


class TensorBoard:
    """Event files under <output>/tensorboard (torch.utils.tensorboard). A resumed run drops the events written
    after its checkpoint (purge_step), as metrics.jsonl drops those lines."""

    def __init__(self, out: Path, resumed_at: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch's writer needs the tensorboard package
            raise UserError(f"--report-to tensorboard needs the tensorboard package ({error}): "
                            "pip install tensorboard") from None
        # events from the step after the checkpoint's on are the resumed run's to write again
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"),
                                    purge_step=None if resumed_at is None else resumed_at + 1)

    def log(self, record: dict):
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def close(self):
        self.writer.close()


class Wandb:
    """A Weights & Biases run in offline mode under <output>/wandb (`wandb sync` uploads it later), if wandb is
    installed; the run's configuration is its config."""

    def __init__(self, out: Path, config: dict, resumed_at: int | None):
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb: the wandb package is not installed; pip install wandb "
                            "(the run is written offline, under the output folder), "
                            "or use --report-to tensorboard") from None
        self.run = wandb.init(mode="offline", dir=str(out), project="lora-mm", name=out.name, config=config,
                              id=out.name, resume="allow" if resumed_at is not None else None)

    def log(self, record: dict):
        self.run.log(scalars(record), step=record["step"])

    def close(self):
        self.run.finish()


class MetricsLog:
    """metrics.jsonl, appended line by line (line-buffered: a crash loses at most the line being written), and
    the dashboards of --report-to, which get every record too."""

    def __init__(self, path: Path, active: bool, report_to: tuple[str, ...] = ()):
        self.path, self.active, self.file = Path(path), active, None
        self.report_to, self.dashboards = tuple(report_to), []

    def start(self, resumed_at: int | None, config: dict | None = None):
        """Open for appending. A fresh run starts an empty file; a resumed one first drops the lines written
        after its checkpoint (and a half-written last line), since the resumed run writes them again. `config`:
        the run's configuration, for the dashboards that keep one."""
        if not self.active:
            return
        if resumed_at is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if before_checkpoint(line, resumed_at)]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8", buffering=1)
        for name in self.report_to:
            self.dashboards.append(TensorBoard(self.path.parent, resumed_at) if name == "tensorboard"
                                   else Wandb(self.path.parent, config or {}, resumed_at))

    def log(self, record: dict):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
        for dashboard in self.dashboards:
            dashboard.log(record)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        for dashboard in self.dashboards:
            dashboard.close()
        self.dashboards = []


def before_checkpoint(line: str, step: int) -> bool:
    """Was this metrics.jsonl line written before the checkpoint of `step`? (An evaluation at that
    step comes before its checkpoint; a non-finite report at that step is about the next update.)"""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # the half-written last line of a killed run
        return False
    return record["step"] < step or (record["step"] == step and ("loss" in record or "eval" in record))


def plot_curves(metrics_path: Path, png_path: Path, curves: tuple[str, str, dict]):
    """Training loss and the evaluations against steps, from metrics.jsonl, as a PNG (atomic).
    `curves`: the task's (y label, title, {label: metrics -> value})."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("eval")]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ylabel, title, values = curves
    ax_eval.set(xlabel="step", ylabel=ylabel, title=title)
    for label, value in values.items():
        ax_eval.plot([r["step"] for r in evals], [value(r["eval"]) for r in evals], marker="o", label=label)
    ax_eval.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def padding_shares(micro_batches: list[dict]) -> dict:
    """What a step computed on padding: "padding", the share of log-mel frames (what --bucket-by-length keeps
    small), and "lm_padding", the share of the language model's input positions (what --pack removes)."""
    shares = {}
    frames = [b["frame_mask"] for b in micro_batches if b.get("frame_mask") is not None]
    if frames:
        shares["padding"] = sum(1 - mask.float().mean().item() for mask in frames) / len(frames)
    lm_tokens = sum(b.get("lm_tokens", 0) for b in micro_batches)
    if lm_tokens:
        shares["lm_padding"] = sum(b["padding_tokens"] for b in micro_batches) / lm_tokens
    return shares


class StepLog:
    """The launched steps, read in order: counted in the state, logged, shown on the progress bar (printed about
    20 times a run where there is no terminal), a non-finite one handed to the guard (engine/nonfinite.py).
    Reading a step is the one place the host waits for the device: once per --log-every steps, or at an
    evaluation or a checkpoint."""

    def __init__(self, metrics: MetricsLog, guard, max_steps: int, main: bool, initial: int):
        self.metrics, self.guard, self.max_steps, self.main = metrics, guard, max_steps, main
        self.bar = tqdm(total=max_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        disable=None if main else True)

    def read(self, launched: list[LaunchedStep], state):
        for step in launched:
            result = step.result()
            if result.status == "nonfinite":
                self.guard(result, step.micro_batches, state)
                continue
            if result.status != "updated":
                continue  # "empty": nothing readable in the global batch; "overflow": fp16 scaler skipped it
            state.bad_in_a_row = 0
            state.step += 1
            per_s = result.examples / max(step.seconds, 1e-9)  # wall time, waiting for data included
            self.metrics.log({"step": state.step, "epoch": state.epoch, "loss": result.loss, "lr": result.lr,
                              "grad_norm": result.grad_norm, "examples_per_s": per_s, "data_wait_s": step.data_wait}
                             | padding_shares(step.micro_batches))
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.2e}", per_s=f"{per_s:.0f}")
            if self.main and self.bar.disable and (state.step % max(1, self.max_steps // 20) == 0 or state.step == 1):
                print(f"step {state.step}/{self.max_steps}  loss {result.loss:.4f}  lr {result.lr:.2e}  "
                      f"{per_s:.0f} examples/s", flush=True)

    def close(self):
        self.bar.close()


def print_summary(model, state, task, out: Path, eval_data: str | None):
    """The end of a run on the terminal: steps and time, what trained, what was skipped, before and after,
    where the outputs are and how to evaluate them again."""
    summary = trainable_summary(model)
    print(f"\ndone: {state.step} steps in {state.elapsed / 60:.1f} min; trainable {summary.trainable:,} parameters "
          f"({100 * summary.share:.3f}%)")
    print(f"skipped inputs: {len(state.skipped)}" + (f" (listed in {out / SKIPPED_FILE})" if state.skipped else ""))
    if state.history.get("before") and state.history.get("after"):
        print(f"before: {task.headline(state.history['before'])}")
        print(f"after:  {task.headline(state.history['after'])}")
    print(f"outputs in {out}: adapter_model.safetensors, adapter_config.json, heads.safetensors, run_config.json, "
          f"metrics.jsonl, {SKIPPED_FILE}, {CURVES_FILE}, {STATE_FILE}")
    print(f"evaluate again with: python eval.py --checkpoint {out}" + (f" --data {eval_data}" if eval_data else ""))


def describe_setup(model, sampler, max_steps: int, world_size: int, out: Path) -> str:
    """What trains and how the run is cut: the lines a run prints before its first step."""
    lines = [str(trainable_summary(model)), str(lora_placement(model)),
             f"{max_steps} steps of {sampler.global_batch} examples ({sampler.batches_per_epoch} per epoch) = "
             f"{world_size} process(es) x {sampler.accumulation} micro-batch(es) of {sampler.micro_batch}; "
             f"output {out}"]
    if sampler.dropped_per_epoch:
        lines.append(f"each epoch leaves out its last {sampler.dropped_per_epoch} example(s) (a partial global batch; "
                     "the next epoch reshuffles)")
    return "\n".join(lines)


def describe_quantization(model, kept: tuple[str, ...]) -> str:
    """--quantize nf4: how many Linear layers are held in NF4, their bytes before and after, and what was kept."""
    held, original = nf4_bytes(model)
    n_layers = sum(isinstance(m, NF4Linear) for m in model.modules())
    return (f"--quantize nf4: {n_layers} Linear layers held in NF4, {size(original)} -> {size(held)}; "
            "kept in their dtype: the output head, norms, embeddings" + "".join(f", {k}" for k in kept))
