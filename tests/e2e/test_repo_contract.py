"""Promises the repository makes about itself: CI runs the README's test command, and the
runtime code never imports the test-only references."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ["common", "lora", "models", "data", "engine", "evaluation", "tasks", "cli.py", "train.py", "eval.py"]
# The floors, bottom first: a module may import its own floor's and the ones below, never one above.
FLOORS = [["common"], ["lora"], ["models", "data"], ["engine", "evaluation"], ["tasks"], ["cli"], ["train", "eval"]]
FORBIDDEN = {"transformers", "peft", "torchaudio", "bitsandbytes", "datasets"}


def readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Run the tests", 1)[1]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1)
    return block.strip().splitlines()[0].strip()


def test_ci_runs_exactly_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert commands[-1] == readme_test_command()


def test_ci_installs_torch_first_and_never_torchaudio():
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    installs = [line for line in script.splitlines() if "pip install" in line and not line.strip().startswith("#")]
    assert "torch==2.13.0" in installs[0]
    assert not any("torchaudio" in line for line in installs)
    for name in ("requirements.txt", "requirements-dev.txt"):
        requirements = [line.split("#")[0] for line in (ROOT / name).read_text(encoding="utf-8").splitlines()]
        assert not any("torchaudio" in line for line in requirements), name


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_runtime_code_never_imports_test_only_references():
    files = python_files(RUNTIME)
    assert any(f.parent.name == "lora" for f in files), "the scan must see the lora package"
    offenders = {str(f.relative_to(ROOT)): sorted(imported_modules(f) & FORBIDDEN) for f in files}
    assert {f: names for f, names in offenders.items() if names} == {}


def test_imports_only_go_down_the_floors():
    """Every runtime module imports only from its own floor or those below (README, Layout); and no model or
    data module imports the training engine."""
    floor_of = {name: level for level, names in enumerate(FLOORS) for name in names}
    upward = []
    for file in python_files(RUNTIME):
        own = floor_of[file.relative_to(ROOT).parts[0].removesuffix(".py")]
        for name in imported_modules(file):
            if name in floor_of and floor_of[name] > own:
                upward.append(f"{file.relative_to(ROOT)} imports {name}")
    assert upward == []


def test_contract_names_exist_with_docstrings():
    import inspect

    import lora
    import models
    import models.audio_text
    import models.export

    names = {
        lora: ["LoRAConfig", "LinearWithLoRA", "inject_lora", "mark_only_lora_trainable", "lora_state_dict",
               "merge_lora", "unmerge_lora", "trainable_summary", "save_adapter", "load_adapter", "diagnose",
               "cast_frozen"],
        models: ["load_audio_encoder", "audio_to_features", "load_text_encoder", "load_tokenizer", "load_instructblip",
                 "load_qwen2_audio", "load_llama"],
        models.audio_text: ["load_run", "AudioTextModel"],
        models.export: ["main", "export_run"],
    }
    missing = [f"{module.__name__}.{name}" for module, listed in names.items() for name in listed
               if not inspect.getdoc(getattr(module, name, None)) or getattr(module, name, None) is None]
    assert missing == []
    for method in ("embed_audio", "embed_text"):  # the Python API of a trained run
        assert inspect.getdoc(getattr(models.audio_text.AudioTextModel, method)), method


def python_files(entries) -> list[Path]:
    files = []
    for entry in entries:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_lines_are_at_most_120_characters():
    long = [f"{file.relative_to(ROOT)}:{n}" for file in python_files(RUNTIME + ["bench", "tests"])
            for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 120]
    assert long == []


def test_no_code_file_is_much_over_400_lines():
    """Short enough to read top to bottom (STYLE.md): a file that outgrows this is split by what it does."""
    sizes = {str(file.relative_to(ROOT)): len(file.read_text(encoding="utf-8").splitlines())
             for file in python_files(RUNTIME + ["bench"])}
    assert {name: n for name, n in sizes.items() if n > 420} == {}


def test_starting_train_or_eval_leaves_torch_dynamo_unimported():
    """torch._dynamo costs about a second at every process start (each train.py, each torchrun rank): only a
    compile or the CUDA variable-length attention may import it, on first use (models/attention.varlen_kernel)."""
    done = subprocess.run([sys.executable, "-c", "import sys, train, eval, models.export; "
                           "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
