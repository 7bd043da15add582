"""Export a trained run as a plain Hugging Face checkpoint: LoRA merged into the base's own weights.

    python -m models.export --checkpoint runs/demo --out exported/

An adapter runs only where something knows LoRA (this toolkit, PEFT). Merged, W' = W + s·B@A
(Hu et al. 2021; lora/layer.py `LinearWithLoRA.merge`), the tuned tower is an ordinary checkpoint
that transformers or a serving engine loads exactly as it loads the base. So the export keeps the
base's own layout, key for key and shard for shard:

    base                      rewritten                                    kept byte-identical
    Qwen2-Audio, sharded      the shards holding a merged audio_tower.*    every other shard (a hard link, else a copy)
    Whisper                   model.safetensors: merged model.encoder.*    every other tensor (the decoder) as it was
    InstructBLIP              the shard(s) holding a merged qformer.*      vision model, T5, ... as they were

The index (model.safetensors.index.json) comes along: keys, shard names, dtypes and shapes do not
change, so neither does it. config.json, the tokenizer and processor files, a `*tokenizer*/`
folder (InstructBLIP's qformer_tokenizer/) and the license come along too; the base's own
README.md becomes README.base.md. Beside them:

    heads.safetensors   the run's fully trained tensors (audio_proj, text_proj, logit_scale are not
                        part of any base architecture; load them with common.run_files.load_heads)
    README.md           what was merged: the run, the base, targets, rank, alpha, the layers
    export.json         the same for programs

Fully trained tensors that *are* base tensors (InstructBLIP's `--train-also language_projection`)
are written into the checkpoint as well. An audio-text run whose LoRA also reaches the text tower
gets that tower's merged checkpoint in `text_model/`.

How it is done: the adapter's (A, B) pairs and the heads are read; every target weight is read
alone from its shard (models/checkpoint.py), merged in fp32 by LinearWithLoRA.merge (which refuses
a non-finite result), and cast back to the base tensor's dtype. Every merge happens before
anything is written, in a temporary folder beside --out that is renamed into place at the end, so
a failure leaves no half export. --out must not exist or be empty, and may not be the base's
folder or lie inside it.
"""

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lora.adapter import read_adapter_config, read_adapter_weights
from common.atomic import atomic_write, atomic_write_text
from common.run_config import RunConfig
from common.run_files import HEADS_FILE, read_run_config
from lora.init import modifies_base
from lora.layer import LinearWithLoRA
from lora.targets import compact_paths
from models.bert import bert_prefix
from models.checkpoint import CONFIG, INDEX, Checkpoint
from models.instructblip import CHILDREN as INSTRUCTBLIP_CHILDREN
from models.instructblip import instructblip_prefix
from models.loading import audio_tower_prefix

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
NAMES = {"qwen2_audio": "Qwen2-Audio", "qwen2_audio_encoder": "Qwen2-Audio encoder", "whisper": "Whisper",
         "instructblip": "InstructBLIP", "bert": "BERT"}


@dataclass
class Base:
    """One base checkpoint that tensors of the run belong to, and where its merged copy goes."""

    checkpoint: Checkpoint
    out: str  # folder inside --out: "." for the main base
    prefixes: dict[str, str]  # the model's top-level name -> its key prefix in this checkpoint
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint key -> new tensor

    def key_of(self, name: str) -> str | None:
        """The checkpoint key of a parameter of the model
        ('audio_tower.conv1.weight' -> 'model.encoder.conv1.weight')."""
        top, _, rest = name.partition(".")
        return self.prefixes[top] + rest if top in self.prefixes else None

    def tensor(self, key: str) -> torch.Tensor:
        """One base tensor, read alone from the shard that holds it."""
        if key not in self.checkpoint.weight_map:
            raise ValueError(f"{self.checkpoint.source} has no tensor {key!r} to merge into; "
                             "is this the base the run was trained on?")
        return self.checkpoint.load_prefix(key)[""]


def bases_of(run: RunConfig) -> list[Base]:
    """The base checkpoints of a run, main one first, each with the key prefixes of the model's parts."""
    sources = run.sources
    if run.task == "instructblip":
        checkpoint = Checkpoint.open(sources.model)
        prefix = instructblip_prefix(checkpoint)
        prefixes = ({child: f"{prefix}{child}." for child in INSTRUCTBLIP_CHILDREN}
                    | {"query_tokens": f"{prefix}query_tokens"})
        return [Base(checkpoint, ".", prefixes)]
    if run.task == "audio-qa":  # the whole Qwen2-Audio, its parts under the hub layout's names
        checkpoint = Checkpoint.open(sources.model)
        prefixes = {"audio_tower": audio_tower_prefix(checkpoint), "multi_modal_projector": "multi_modal_projector.",
                    "language_model": "language_model."}
        return [Base(checkpoint, ".", prefixes)]
    audio, text = Checkpoint.open(sources.audio_model), Checkpoint.open(sources.text_model)
    audio_prefixes = {"audio_tower": audio_tower_prefix(audio)}
    if run.model.encoding_strategy == "full_forward":  # the whole Qwen2-Audio, its parts under the hub layout's names
        audio_prefixes |= {"multi_modal_projector": "multi_modal_projector.", "language_model": "language_model."}
    return [Base(audio, ".", audio_prefixes), Base(text, "text_model", {"text_tower": bert_prefix(text.weight_map)})]


def locate(bases: list[Base], name: str) -> tuple[Base, str] | None:
    for base in bases:
        key = base.key_of(name)
        if key is not None:
            return base, key
    return None


def merged_layer(weight: torch.Tensor, bias: torch.Tensor | None, pair: dict, config, path: str) -> tuple:
    """(W', b') of the module at `path` with its adapter merged, computed in fp32 by the LoRA layer itself
    (LinearWithLoRA.merge: plain LoRA, rsLoRA, per-module rank and alpha, DoRA's magnitude, lora_bias)
    and returned in the base tensors' dtypes; b' is None when the base has no bias."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.float(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.float(), requires_grad=False)
    layer = LinearWithLoRA(linear, config.rank_for(path), config.alpha_for(path), rslora=config.rslora,
                           lora_bias="lora_B.bias" in pair, use_dora=config.use_dora)
    layer.module_path = path
    with torch.no_grad():
        for name in layer.adapter_params():  # lora_A.weight, lora_B.weight[, lora_B.bias][, lora_magnitude_vector]
            layer.get_parameter(name).copy_(pair[name.removesuffix(".weight")] if name.endswith(".weight")
                                            else pair[name])
    layer.merge()  # raises, naming the layer, if the merged weight is not finite
    merged_bias = None if bias is None else layer.bias.detach().to(bias.dtype)
    return layer.weight.detach().to(weight.dtype), merged_bias


def plan(run_dir: Path, bases: list[Base]) -> dict:
    """Fill each base's `replaced` with the heads that are base tensors and the merged LoRA weights."""
    config = read_adapter_config(run_dir)
    if modifies_base(config.init):
        raise ValueError(f"{run_dir}: a {config.init} adapter moved part of the base weight into LoRA, so merging it "
                         "onto the checkpoint as released would count that part twice; save it converted to a plain "
                         "adapter (save_adapter(..., initial=...), as train.py does) and export that")
    pairs = read_adapter_weights(run_dir)
    heads = load_file(str(run_dir / HEADS_FILE))
    beside, into = [], []
    for name, tensor in sorted(heads.items()):
        found = locate(bases, name)
        if found is None:
            beside.append(name)  # audio_proj, text_proj, logit_scale: no base has them
            continue
        base, key = found
        original = base.tensor(key)
        if original.shape != tensor.shape:
            raise ValueError(f"{run_dir / HEADS_FILE}: {name} has shape {tuple(tensor.shape)}, "
                             f"the base's {key} {tuple(original.shape)}")
        base.replaced[key] = tensor.to(original.dtype)
        into.append(name)
    for path, pair in sorted(pairs.items()):
        found = locate(bases, f"{path}.weight")
        if found is None:
            raise ValueError(f"{run_dir}: the adapter holds LoRA for {path}, which is in none of the base checkpoints")
        base, key = found
        original = base.tensor(key)
        # a trained-also weight merges too
        weight = base.replaced[key].to(original.dtype) if key in base.replaced else original
        bias_key = key.removesuffix("weight") + "bias"
        bias = base.tensor(bias_key) if bias_key in base.checkpoint.weight_map else None
        if bias is not None and bias_key in base.replaced:
            bias = base.replaced[bias_key].to(bias.dtype)
        merged, merged_bias = merged_layer(weight, bias, pair, config, path)
        base.replaced[key] = merged
        if merged_bias is not None and "lora_B.bias" in pair:  # lora_bias adds s·b_B to the base bias
            base.replaced[bias_key] = merged_bias
    return {"config": config, "merged": sorted(pairs), "heads_beside": beside, "heads_into": into}


# ---- writing ---------------------------------------------------------------------------------------

def fsync(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def link_or_copy(source: Path, target: Path, link: bool) -> str:
    """Hard-link `source` at `target` when allowed and possible (same filesystem), else copy it."""
    if link:
        try:
            os.link(source.resolve(), target)  # resolve: a hub cache's snapshot entry is a symlink to its blob
            return "linked"
        except OSError:
            pass
    shutil.copyfile(source, target)
    fsync(target)
    return "copied"


def base_folder(checkpoint: Checkpoint) -> Path:
    """The local folder of a checkpoint: its directory, or its snapshot in the hub cache."""
    return checkpoint.directory if checkpoint.directory is not None else checkpoint.file(CONFIG).parent


def copy_side_files(source: Path, target: Path, weight_files: set[str]) -> list[str]:
    """config, tokenizer, processor and license files (top level, and `*tokenizer*/` folders); no weights."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.name.startswith(".") or path.name in weight_files or path.name == INDEX:
            continue
        if path.is_dir() and "tokenizer" in path.name:
            shutil.copytree(path, target / path.name)
            copied.append(path.name + "/")
        elif path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            name = "README.base.md" if path.name == "README.md" else path.name
            shutil.copyfile(path, target / name)
            copied.append(name)
    return copied


def write_base(base: Base, target: Path, link: bool) -> dict:
    """The base's checkpoint in `target` with its `replaced` tensors swapped in; returns what happened to each file."""
    checkpoint = base.checkpoint
    target.mkdir(parents=True, exist_ok=True)
    shards = sorted(set(checkpoint.weight_map.values()))
    report = {"source": checkpoint.source, "out": base.out, "model_type": checkpoint.config.get("model_type"),
              "rewritten": [], "linked": [], "copied": [], "replaced_keys": sorted(base.replaced),
              "side_files": copy_side_files(base_folder(checkpoint), target, set(shards))}
    for shard in shards:
        source = checkpoint.file(shard)
        wanted = {key: tensor for key, tensor in base.replaced.items() if checkpoint.weight_map[key] == shard}
        if not wanted:
            report[link_or_copy(source, target / shard, link)].append(shard)
            continue
        with safe_open(str(source), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        for key, tensor in wanted.items():
            if tensors[key].shape != tensor.shape or tensors[key].dtype != tensor.dtype:
                raise AssertionError(f"{key}: the replacement does not keep the base's shape and dtype")
            tensors[key] = tensor.contiguous()
        atomic_write(target / shard, lambda tmp, tensors=tensors: save_file(tensors, str(tmp), metadata=metadata))
        shutil.copymode(source, target / shard)  # the base file's permissions, whatever save_file chose
        report["rewritten"].append(shard)
    if checkpoint.index_file == INDEX:
        shutil.copyfile(checkpoint.file(INDEX), target / INDEX)  # same keys, shards, dtypes and shapes: the same index
        fsync(target / INDEX)
    return report


def readme(run_dir: Path, run: RunConfig, summary: dict, reports: list[dict]) -> str:
    """A short README.md for the export: what was merged into what, and how to load it."""
    config = summary["config"]
    lines = [f"# LoRA merged: {run_dir.name}", "",
             f"Written by `python -m models.export --checkpoint {run_dir}`. The LoRA adapter of that run is merged "
             f"into the base weights (W + s·B@A, computed in fp32, stored in each base tensor's dtype), so this folder "
             f"loads like the base itself, with no LoRA code.", "",
             f"- task: {run.task}; targets: {', '.join(f'`{t}`' for t in run.lora.targets)}",
             (f"- rank {config.r}, alpha {config.alpha:g}, "
              f"{'rsLoRA, ' if config.rslora else ''}scaling {config.scaling:g}"),
             f"- merged layers ({len(summary['merged'])}): "
             + "; ".join(f"`{p}`" for p in compact_paths(summary["merged"]))]
    if summary["heads_into"]:
        lines.append("- fully trained tensors written into the checkpoint: "
                     + ", ".join(f"`{n}`" for n in summary["heads_into"]))
    for report in reports:
        where = "this folder" if report["out"] == "." else f"`{report['out']}/`"
        name = NAMES.get(report["model_type"], report["model_type"])
        kept = len(report["linked"]) + len(report["copied"])
        lines.append(f"- {where}: the {name} checkpoint `{report['source']}`, "
                     f"{len(report['replaced_keys'])} tensors replaced; "
                     f"weight files rewritten: {', '.join(report['rewritten']) or 'none'}; {kept} kept byte-identical "
                     f"({len(report['linked'])} hard-linked, {len(report['copied'])} copied)")
    lines.append("- `heads.safetensors`: the run's fully trained tensors "
                 + ", ".join(f"`{n}`" for n in summary["heads_beside"] + summary["heads_into"])
                 + (" (the projection heads and temperature are not part of the base architecture; "
                    "`common.run_files.load_heads` reads them)" if summary["heads_beside"] else ""))
    if run.task == "audio-text" and len(reports) == 1:
        lines.append(f"- the text tower is unchanged: pair this audio tower with `{run.sources.text_model}`")
    return "\n".join(lines) + "\n"


def export_run(run_dir, out_dir, link: bool = True) -> dict:
    """Merge the run's adapter into its base checkpoint(s) and write them to `out_dir`; see the module docstring.
    Returns what export.json records."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = read_run_config(run_dir)
    bases = bases_of(run)
    out = out_dir.resolve()
    for base in bases:
        folder = base_folder(base.checkpoint).resolve()
        if out == folder or folder in out.parents:
            raise ValueError(f"refusing to export into {out_dir}: it is the base checkpoint {base.checkpoint.source} "
                             "(or inside it); choose a new folder")
    if out == run_dir.resolve():
        raise ValueError(f"refusing to export into {out_dir}: it is the run directory itself; choose a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"refusing to export into {out_dir}: it exists and is not an empty folder; choose a new one")

    summary = plan(run_dir, bases)  # every merge before anything is written: all or nothing
    written = [base for i, base in enumerate(bases) if i == 0 or base.replaced]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        reports = [write_base(base, staging / base.out, link) for base in written]
        shutil.copyfile(run_dir / HEADS_FILE, staging / HEADS_FILE)
        fsync(staging / HEADS_FILE)
        atomic_write_text(staging / "README.md", readme(run_dir, run, summary, reports))
        record = {"run": str(run_dir.resolve()), "task": run.task, "targets": list(run.lora.targets),
                  "r": summary["config"].r, "alpha": summary["config"].alpha, "rslora": summary["config"].rslora,
                  "merged_layers": summary["merged"], "heads_into_checkpoint": summary["heads_into"],
                  "heads_beside": summary["heads_beside"], "bases": reports}
        atomic_write_text(staging / "export.json", json.dumps(record, indent=2) + "\n")
        os.replace(staging, out)  # one rename: an empty --out is replaced, a missing one created
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def main(argv=None):
    """`python -m models.export --checkpoint RUN_DIR --out NEW_DIR [--copy]`: export_run, then a report."""
    parser = argparse.ArgumentParser(description="Merge a train.py run's LoRA into its base and write a Hugging Face "
                                     "checkpoint in the base's own layout (see the module docstring of "
                                     "models/export.py).")
    parser.add_argument("--checkpoint", required=True, help="an output directory of train.py")
    parser.add_argument("--out", required=True, help="a new (or empty) folder for the merged checkpoint")
    parser.add_argument("--copy", action="store_true", help="copy unchanged shards instead of hard-linking them")
    args = parser.parse_args(argv)
    try:
        record = export_run(args.checkpoint, args.out, link=not args.copy)
    except (FileNotFoundError, ValueError) as error:  # the run, its base or --out: the user's to fix
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # the export is built in a staging folder: nothing half-written is left at --out
        print(f"\ninterrupted; nothing was written to {args.out}", file=sys.stderr)
        raise SystemExit(130) from None
    for report in record["bases"]:
        where = Path(args.out) / report["out"] if report["out"] != "." else Path(args.out)
        print(f"{where}: {NAMES.get(report['model_type'], report['model_type'])} from {report['source']}, "
              f"{len(report['replaced_keys'])} tensors replaced in {', '.join(report['rewritten']) or 'no file'}; "
              f"{len(report['linked'])} weight files hard-linked, {len(report['copied'])} copied unchanged")
    print(f"merged {len(record['merged_layers'])} LoRA layers: {'; '.join(compact_paths(record['merged_layers']))}")
    print(f"{Path(args.out) / HEADS_FILE}: {', '.join(record['heads_beside'] + record['heads_into_checkpoint'])}")
    return record


if __name__ == "__main__":
    main()
