"""--report-to: TensorBoard event files hold what metrics.jsonl holds (read back with tensorboard's own event
reader), a resumed run drops the events after its checkpoint, and W&B without the package is one error line."""

import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from engine.reporting import scalars
from tests.conftest import train_flags


def events(out) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_every_step_and_evaluation_of_metrics_jsonl(tiny, tmp_path):
    out = tmp_path / "run"
    train.train(train.parse_args(train_flags(tiny, out, "--report-to", "tensorboard", eval_data=tiny["eval"],
                                             batch_size=8, max_steps=3)))
    logged = events(out)
    steps = [r for r in records(out) if "loss" in r]
    assert len(steps) == 3
    for name in ("loss", "lr", "grad_norm", "examples_per_s", "data_wait_s"):
        assert [s for s, _ in logged[f"train/{name}"]] == [r["step"] for r in steps]
        for (_, value), record in zip(logged[f"train/{name}"], steps):
            assert abs(value - record[name]) <= 1e-6 * max(1.0, abs(record[name])), name  # TensorBoard keeps float32
    evaluations = [r for r in records(out) if "eval" in r]
    assert [s for s, _ in logged["eval/text_to_audio/R@1"]] == [r["step"] for r in evaluations] == [0, 3]
    assert ({f"eval/{d}/{k}" for d in ("text_to_audio", "audio_to_text") for k in ("R@1", "R@5", "R@10", "mAP@10")}
            <= set(logged))


def test_a_resumed_run_drops_the_events_after_its_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    flags = train_flags(tiny, out, "--report-to", "tensorboard", batch_size=8, max_steps=4, save_every=2)
    real_save = train.save_outputs

    def save_until_step_2(run, model, lora_config, config, state, initial=None):  # as if killed before step 4's save
        if state["step"] <= 2:
            real_save(run, model, lora_config, config, state, initial)

    monkeypatch.setattr(train, "save_outputs", save_until_step_2)
    train.train(train.parse_args(flags))
    assert [s for s, _ in events(out)["train/loss"]] == [1, 2, 3, 4]
    monkeypatch.setattr(train, "save_outputs", real_save)
    train.train(train.parse_args(flags + ["--resume"]))
    assert [s for s, _ in events(out)["train/loss"]] == [1, 2, 3, 4]  # steps 3 and 4 once each, not twice


def test_scalars_flatten_evaluations_and_leave_texts_out():
    record = {"step": 5, "eval": {"exact_match": 50.0, "loss": 1.5, "n_examples": 4, "samples": [{"prompt": "q"}],
                                  "text_to_audio": {"R@1": 10.0}}}
    assert scalars(record) == {"eval/exact_match": 50.0, "eval/loss": 1.5, "eval/n_examples": 4.0,
                               "eval/text_to_audio/R@1": 10.0}
    assert scalars({"step": 1, "loss": 0.5, "lr": 1e-3}) == {"train/loss": 0.5, "train/lr": 1e-3}
    assert scalars({"step": 1, "nonfinite": {"loss": "nan"}}) == {}


def test_wandb_without_the_package_is_one_error_line(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError, installed or not
    assert train.main(train_flags(tiny, tmp_path / "run", "--report-to", "wandb", batch_size=8, max_steps=1)) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --report-to wandb: the wandb package is not installed") and error.count("\n") == 1
