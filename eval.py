"""Evaluate a train.py output directory: retrieval (audio-text) or answers (instructblip, audio-qa).

    python eval.py --checkpoint runs/demo --data eval.jsonl [--json OUT.json] [--no-adapter]
                   [--save-embeddings OUT.npz] [--precision fp32|bf16|fp16]
    python eval.py --checkpoint runs/demo --search "a dog barks twice" --audio-dir clips/ [--top 10] [--index F.npz]
    python eval.py --checkpoint runs/demo --zero-shot ROOT_OR_CSV [--template 'the sound of {label}'] [--json OUT]

The run's task (run_config.json) rebuilds its model and evaluates (tasks/): audio-text runs load through
models/audio_text.py `load_run` and embed with its `embed_audio` / `embed_text`, so the Python API and this
command score the same numbers (evaluation/retrieval.py: R@1/5/10 and mAP@10 both ways, LAION-CLAP's
conventions); instructblip and audio-qa runs answer by greedy generation (evaluation/answers.py: answer
loss, perplexity, exact match, and for audio-qa the word error rate). Every mode computes in the run's
precision (--precision overrides), so it reproduces the numbers training printed.

Search (evaluation/search.py): the folder's clips are embedded once and kept in an index (.npz). Zero-shot
classification (evaluation/zero_shot.py, CLIP's recipe): each class name becomes a text prompt through
the template(s); a clip is assigned the class whose prompt embedding is closest.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from common.atomic import atomic_write_text
from common.errors import UserError, user_message
from common.precision import PRECISIONS
from common.run_files import read_run_config
from data.feature_cache import FeatureCache
from evaluation.search import search_clips
from evaluation.zero_shot import DEFAULT_TEMPLATE, classify_zero_shot
from tasks import TASKS


def main(argv=None):
    """The command line; returns the metrics (or search results). A user's mistake is one `error:`
    line and exit status 2 (its traceback with --debug), Ctrl-C one line and 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(parser, args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except UserError as error:
        if args.debug:
            raise
        print(f"error: {user_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate, search with, or classify zero-shot with a train.py output directory.")
    parser.add_argument("--checkpoint", required=True, help="an output directory of train.py")
    parser.add_argument("--data", help="manifest (audio-text: JSONL or Clotho/AudioCaps CSV; instructblip: JSONL); "
                        "default: the run's eval_data")
    parser.add_argument("--audio-dir", help="a folder of audio: with --search alone, the library searched "
                        "(recursively); with --data or a --zero-shot CSV, the folder relative audio paths point into "
                        "(default: the manifest's or CSV's folder)")
    parser.add_argument("--json", help="write the metrics (or search results) here as JSON")
    parser.add_argument("--no-adapter", action="store_true", help="LoRA off (heads kept): what does the adapter add?")
    parser.add_argument("--precision", choices=PRECISIONS, help="default: the run's (run_config.json), which "
                        "reproduces training's numbers; bf16 holds frozen weights in bf16 under bf16 autocast, fp16 "
                        "autocasts over fp32 weights")
    parser.add_argument("--save-embeddings",
                        help="audio-text: write audio, text and text_audio_index arrays to this .npz")
    parser.add_argument("--search", metavar="TEXT",
                        help="audio-text: print the clips of --audio-dir (or --data) closest to this text")
    parser.add_argument("--top", type=int, default=10, help="--search: how many clips to print")
    parser.add_argument("--index", metavar="F.npz", help="--search: where the library's embeddings are kept "
                        "(default: search-index-<hash>.npz in --checkpoint). A file's embedding is reused while its "
                        "path (relative to the folder), size and modification time are unchanged and the checkpoint "
                        "is the same (its run_config.json, heads and adapter by content, the precision, --no-adapter); "
                        "new or changed files are embedded, vanished ones dropped")
    parser.add_argument("--zero-shot", metavar="ROOT_OR_CSV", help="audio-text: classify ROOT/<label>/*.wav "
                        "(a folder per class) or a CSV with filename,label columns; labels become prompts with '_' "
                        "and '-' read as spaces")
    parser.add_argument("--template", action="append", help=f"--zero-shot: the prompt, {{label}} standing for the "
                        f"class name (default {DEFAULT_TEMPLATE!r}); repeat to average several prompts per class")
    parser.add_argument("--batch-size", type=int, help="clips or examples a forward (default: the run's "
                        "--batch-size, as its training-time evaluations used: padding to a batch's longest clip "
                        "rounds differently in another batch)")
    parser.add_argument("--max-new-tokens", type=int, help="instructblip, audio-qa: longest generated answer "
                        "(default: what training evaluated with, 10 and 16)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding audio or images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", default=os.environ.get("LORA_MM_CACHE", str(Path.home() / ".cache" / "lora-mm")),
                        help="audio-text: the log-mel of each clip is read from (or kept in) <cache-dir>/features, "
                        "as train.py does")
    parser.add_argument("--no-feature-cache", action="store_true",
                        help="compute every clip's log-mel afresh (the same numbers)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a mistake the message explains")
    return parser


def load_checkpoint(checkpoint_dir, with_adapter: bool = True, precision: str | None = None, device="cpu"):
    """Rebuild a trained model from an output directory of train.py: (model, tokenizers, run config), in the
    run's precision (or `precision`), through its task's `load_trained`."""
    config = read_run_config(checkpoint_dir)
    if config.task not in TASKS:
        raise UserError(f"{Path(checkpoint_dir) / 'run_config.json'}: unknown task {config.task!r}")
    config = config.replace(precision=precision or config.precision)
    model, tokenizers = TASKS[config.task].load_trained(checkpoint_dir, config, device, with_adapter)
    return model, tokenizers, config


def run(parser: argparse.ArgumentParser, args) -> dict:
    """What main does once the flags are parsed."""
    if args.search and args.zero_shot:
        parser.error("--search and --zero-shot are separate modes: give one of them")
    if args.search and not (args.audio_dir or args.data):
        parser.error("--search needs the clips to search: --audio-dir DIR or --data MANIFEST")
    model, tokenizers, config = load_checkpoint(args.checkpoint, with_adapter=not args.no_adapter,
                                                precision=args.precision, device=args.device)
    task = TASKS[config.task]
    # default: the run's batch, as its training-time evaluations used (padding to a batch's longest clip rounds
    # differently in another batch)
    batch_size = args.batch_size or config.optim.batch_size
    feature_cache = None if args.no_feature_cache else FeatureCache(Path(args.cache_dir) / "features")
    if (args.search or args.zero_shot) and config.task != "audio-text":
        parser.error(f"--search and --zero-shot need an audio-text run; {args.checkpoint} is a {config.task} run")
    try:
        if args.search:
            results = search_clips(model, args.search, args.checkpoint, audio_dir=args.audio_dir, data=args.data,
                                   top=args.top, index=args.index, with_adapter=not args.no_adapter,
                                   batch_size=batch_size, workers=args.workers, feature_cache=feature_cache)
            write_json(args.json, {"query": args.search, "results": results})
            return results
        if args.zero_shot:
            metrics = classify_zero_shot(model, args.zero_shot, args.template, audio_dir=args.audio_dir,
                                         batch_size=batch_size, workers=args.workers, feature_cache=feature_cache,
                                         with_adapter=not args.no_adapter)
            write_json(args.json, metrics)
            return metrics
    except (FileNotFoundError, ValueError) as error:  # a library folder or CSV that cannot be read
        raise UserError(str(error)) from error

    data = args.data or config.sources.eval_data
    if not data:
        parser.error("--data is required: this run recorded no eval_data")
    audio_dir = args.audio_dir or (None if args.data else config.sources.eval_audio_dir)  # where training found them
    metrics = task.evaluate_file(model, tokenizers, config, data, audio_dir, batch_size=batch_size,
                                 workers=args.workers, device=args.device,
                                 max_new_tokens=args.max_new_tokens, feature_cache=feature_cache,
                                 save_embeddings=args.save_embeddings)
    label = f"{Path(data).name}, {'no adapter' if args.no_adapter else 'with adapter'}"
    print(task.format(metrics, label + ("" if config.precision == "fp32" else f", {config.precision}")))
    write_json(args.json, metrics)
    return metrics


def write_json(path, value):
    if path:
        atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
