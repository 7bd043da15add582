"""bench/lora_variants.py end to end on tiny settings: each variant asked for trains in its own process and gets a
row of finite numbers, and the layer-level DoRA timing prints its goal line. The numbers themselves are not tested;
that every variant trains is tests/e2e/test_train_variants.py's (two variants here keep the suite short)."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ["lora", "dora"]


def table_rows(printed: str) -> dict[str, list[str]]:
    """The Markdown table's data rows by variant: {variant: [flags, s/step, xLoRA, peak MiB, ...]}."""
    rows = {}
    for line in printed.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("variant", "---"):
            rows[cells[0]] = cells[1:]
    return rows


TINY_LAYER = ["--layer-dim", "32", "--layer-tokens", "1x16", "--layer-repeats", "2", "--layer-warmup", "1"]


def test_each_variant_gets_a_row_of_finite_numbers(tiny_audio_text, tmp_path):
    tiny = tiny_audio_text
    command = [sys.executable, str(ROOT / "bench" / "lora_variants.py"), "--variants", ",".join(VARIANTS),
               "--steps", "2", "--rounds", "1",
               "--batch-size", "8",
               "--audio-model", tiny["audio_model"], "--text-model", tiny["text_model"], "--train-data", tiny["train"],
               "--eval-data", tiny["eval"], "--train-arg=--workers=0", "--keep-runs", str(tmp_path / "runs"),
               "--no-warmup", "--json", str(tmp_path / "results.json"), *TINY_LAYER]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table_rows(done.stdout)
    assert list(rows) == VARIANTS, done.stdout
    for variant, cells in rows.items():
        numbers = [float(cell) for cell in cells[1:]]  # s/step, xLoRA, median, peak MiB, 4 recalls, wall s, cpu s
        assert len(numbers) == 10 and all(math.isfinite(n) for n in numbers), (variant, cells)
        assert 0 < numbers[0] <= numbers[2], "the fastest step is no slower than the median one"
        assert numbers[3] > 50, "a torch process holds more than 50 MiB"
    assert float(rows["lora"][2]) == 1.0, "xLoRA is relative to LoRA's own row"
    assert re.search(r"DoRA step <= 1\.15x LoRA's step time with dropout 0: (met|not met) \(ours \d", done.stdout)
    assert re.search(r"ours DoRA / PEFT DoRA = \d+\.\d+", done.stdout)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [run["variant"] for run in results["runs"]] == VARIANTS
    assert set(results["layer_ms"]) == {"ours LoRA", "ours DoRA", "PEFT LoRA", "PEFT DoRA"}
    assert all(run["error"] is None for run in results["runs"])
    assert (tmp_path / "runs" / "dora" / "adapter_config.json").is_file(), "--keep-runs keeps the runs' outputs"


def test_a_failed_run_is_a_failed_row_and_a_failed_bench(tmp_path):
    command = [sys.executable, str(ROOT / "bench" / "lora_variants.py"), "--variants", "dora", "--rounds", "1",
               "--no-warmup", "--layer-repeats", "0",  # no layer timing: the failed row is what is tested
               "--train-arg=--no-such-flag", "--json", str(tmp_path / "results.json")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert table_rows(done.stdout)["dora"][:2] == ["--dora", "failed"]
    assert "[dora] failed: train.py exited with 2" in done.stderr and "--no-such-flag" in done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["runs"][0]["step_s"] is None and results["layer_ms"] == {}
    assert "layer step" not in done.stdout


def test_rounds_combine_to_the_lowest_times_and_a_failure_wins():
    spec = importlib.util.spec_from_file_location("lora_variants", ROOT / "bench" / "lora_variants.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    recall = {"text_to_audio": {"R@1": 1.0}}
    slow = bench.VariantRun("dora", ["--dora"], step_s=2.0, median_step_s=2.5, peak_rss_mib=900, wall_s=30, cpu_s=25,
                            recall=recall)
    fast = bench.VariantRun("dora", ["--dora"], step_s=1.0, median_step_s=3.0, peak_rss_mib=800, wall_s=40, cpu_s=20,
                            recall={})
    best = bench.best_of([slow, fast])
    assert (best.step_s, best.median_step_s, best.peak_rss_mib, best.wall_s, best.cpu_s) == (1.0, 2.5, 900, 30, 20)
    assert best.recall == recall, "the first round's recall"
    broken = bench.VariantRun("dora", ["--dora"], error="train.py exited with 1")
    assert bench.best_of([fast, broken]).error == "train.py exited with 1"
