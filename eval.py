"""Evaluate a train.py output directory: retrieval (audio-text) or answers (instructblip).

    python eval.py --checkpoint runs/demo --data eval.jsonl [--json OUT.json] [--no-adapter]
                   [--save-embeddings OUT.npz] [--precision fp32|bf16|fp16]
    python eval.py --checkpoint runs/demo --search "a dog barks twice" --audio-dir clips/ [--top 10] [--index F.npz]
    python eval.py --checkpoint runs/demo --zero-shot ROOT_OR_CSV [--template 'the sound of {label}'] [--json OUT]

Every mode computes in the run's precision (run_config.json; --precision overrides), so it reproduces
the numbers training printed. Audio-text runs load through models/audio_text.py `load_run` and embed
with its `embed_audio` / `embed_text`: the Python API and this command score the same numbers.

Search: the folder's clips are embedded once and kept in an index (.npz); see `search_index`.
Zero-shot classification (CLIP's recipe, Radford et al. 2021): each class name becomes a text
prompt through the template(s); a clip is assigned the class whose prompt embedding is closest.
With several --template, a class's prompt embeddings are averaged and renormalised (CLIP's prompt
ensembling). Labels come from data/audio_folder.py `read_labelled_audio`.

instructblip: token loss and perplexity of the reference answers, and exact-match accuracy of the
greedy answers (lowercased, trimmed, trailing punctuation dropped), with sample generations.
audio-qa (Qwen2-Audio): the same, plus the word error rate of the greedy answers.

Audio-text retrieval:
Conventions (LAION-CLAP's `evaluate_clotho_audiocaps`, also used by WavCaps), for clips with
several captions each:
- text -> audio: every caption is a query; its one relevant item is its clip.
  R@k = share of queries whose clip ranks in the top k; AP@10 = 1 / rank (0 beyond 10).
- audio -> text: every clip is a query; its relevant items are all of its captions.
  R@k counts the best-ranked of them; AP@10 = sum over its captions ranked in the top 10 of
  (precision at that rank), divided by its number of captions.
Ties are broken against the query: a relevant item tied with an irrelevant one ranks after it,
so a collapsed model (every similarity equal) scores chance, not perfection.
All numbers are percentages.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.errors import UserError, user_message
from data.audio_folder import AUDIO_SUFFIXES, find_audio_files, label_text, read_labelled_audio
from data.audio_qa import AudioQADataset, check_audio, collate_audio_qa, read_audio_qa_manifest
from data.audio_text import captions_flat, precheck
from data.instructblip import LLAMA_EOS, VQADataset, check_images, collate_vqa, read_vqa_manifest
from data.manifest import read_manifest
from data.feature_cache import FeatureCache
from data.search_index import default_index_path, save_npz, search_index, unreadable
from lora import load_adapter
from lora.atomic import atomic_write, atomic_write_text
from models import load_instructblip, load_instructblip_tokenizers, load_qwen2_audio, load_qwen2_audio_tokenizer
from models.qwen2_audio import IM_END
from models.llama import LlamaConfig
from models.audio_text import (AUTOCAST_DTYPES, HEADS_FILE, RUN_CONFIG, autocast_dtype, hold_in_run_precision, load_heads,
                               run_quantization,
                               load_run, read_run_config)

RECALL_AT = (1, 5, 10)
MAP_AT = 10


def rank_relevance(similarity: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Each query's candidates sorted best first, as a bool matrix marking the relevant ones.

    similarity and relevant are (Q, C); the result's row q, column j says whether the candidate
    ranked j-th (0-based) for query q is relevant. Equal similarities put irrelevant candidates
    first, then order by candidate index, so the ranking is deterministic.
    """
    columns = np.broadcast_to(np.arange(similarity.shape[1]), similarity.shape)
    # np.lexsort sorts by the last key first: similarity descending, then relevant last, then index.
    order = np.lexsort((columns, relevant, -similarity.astype(np.float64)), axis=-1)  # (Q, C)
    return np.take_along_axis(relevant, order, axis=1)


def rank_metrics(similarity: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (best-ranked relevant item) and mAP@10, in percent, for (Q, C) queries x candidates."""
    hits = rank_relevance(similarity, relevant)  # (Q, C) bool, best first
    n_relevant = relevant.sum(axis=1)  # (Q,)
    if (n_relevant == 0).any():
        raise ValueError(f"query {int(np.argmin(n_relevant))} has no relevant candidate")
    first_hit = hits.argmax(axis=1)  # (Q,) 0-based rank of the best relevant item
    metrics = {f"R@{k}": 100.0 * float(np.mean(first_hit < k)) for k in RECALL_AT}
    top = hits[:, :MAP_AT]  # (Q, 10)
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)  # precision at each rank
    average_precision = (precision * top).sum(axis=1) / n_relevant  # (Q,)
    metrics[f"mAP@{MAP_AT}"] = 100.0 * float(np.mean(average_precision))
    return metrics


def retrieval_metrics(similarity: np.ndarray, text_audio_index: np.ndarray) -> dict:
    """Both directions from a (N_text, N_audio) similarity matrix and each caption's clip index."""
    similarity = np.asarray(similarity)
    text_audio_index = np.asarray(text_audio_index)
    n_text, n_audio = similarity.shape
    if text_audio_index.shape != (n_text,):
        raise ValueError(f"text_audio_index has shape {text_audio_index.shape}, expected ({n_text},)")
    relevant = text_audio_index[:, None] == np.arange(n_audio)[None, :]  # (N_text, N_audio)
    return {
        "text_to_audio": rank_metrics(similarity, relevant),
        "audio_to_text": rank_metrics(similarity.T, relevant.T),
        "n_audio": int(n_audio),
        "n_text": int(n_text),
    }


def format_metrics(metrics: dict, title: str = "") -> str:
    """A small table of both directions, for the terminal."""
    names = [f"R@{k}" for k in RECALL_AT] + [f"mAP@{MAP_AT}"]
    head = f"{title or 'retrieval'} ({metrics['n_audio']} clips, {metrics['n_text']} captions)"
    lines = [head, f"  {'':<14}" + "".join(f"{n:>9}" for n in names)]
    for direction in ("text_to_audio", "audio_to_text"):
        row = metrics[direction]
        lines.append(f"  {direction:<14}" + "".join(f"{row[n]:>9.2f}" for n in names))
    return "\n".join(lines)


def encode_clips(model, tokenizer, clips, batch_size=32, pad_to_30s=None, device=None, workers=0, autocast_dtype=None, progress=True,
                 feature_cache=None, text_cache=None):
    """Embed every clip and every caption: (audio (N_audio, E), text (N_text, E), text_audio_index (N_text,)).

    Exactly `model.embed_audio` / `model.embed_text` (models/audio_text.py), so the Python API and
    eval.py give the same numbers. autocast_dtype None and pad_to_30s None mean the model's own (a
    load_run model: its run's; a model built in memory: fp32, no padding). The model's device is
    used; `device` is accepted for train.py's calls. The caches (data/feature_cache.py,
    models/text_cache.py) serve what they hold. Every caption of every clip is a query
    (captions_flat); a bad file is an error here, since a dropped clip would shift the caption-to-clip index.
    """
    audio = model.embed_audio([clip.audio for clip in clips], batch_size=batch_size, progress=None if progress else False,
                              workers=workers, precision=autocast_dtype, pad_to_30s=pad_to_30s, feature_cache=feature_cache)
    texts, text_audio_index = captions_flat(clips)
    text = model.embed_text(texts, progress=None if progress else False, precision=autocast_dtype, tokenizer=tokenizer,
                            text_cache=text_cache)  # in canonical chunks: no batch size to agree on
    return audio.numpy(), text.numpy(), np.asarray(text_audio_index)


def evaluate(model, tokenizer, clips, **kwargs) -> dict:
    """retrieval_metrics of the model on these clips (all captions)."""
    audio, text, text_audio_index = encode_clips(model, tokenizer, clips, **kwargs)
    return retrieval_metrics(text @ audio.T, text_audio_index)


def load_checkpoint(checkpoint_dir, with_adapter: bool = True, precision: str | None = None, device="cpu"):
    """Rebuild a trained model from an output directory of train.py: (model, tokenizers, run_config).

    audio-text: models/audio_text.py `load_run`, tokenizers the text tower's tokenizer; instructblip:
    its own loader, tokenizers (Q-Former, T5). Both in the run's precision (or `precision`), by the
    rule training uses (`hold_in_run_precision`); run_config["precision"] says which one was applied.
    """
    checkpoint_dir = Path(checkpoint_dir)
    run = read_run_config(checkpoint_dir)
    precision = precision or run.get("precision", "fp32")
    if run.get("task") == "audio-text":
        model = load_run(checkpoint_dir, device=device, precision=precision, with_adapter=with_adapter)
        return model, model.tokenizer, dict(run, precision=precision)
    if run.get("task") not in ("instructblip", "audio-qa"):
        raise ValueError(f"{checkpoint_dir / RUN_CONFIG}: unknown task {run.get('task')!r}")
    load, load_tokenizers = ((load_instructblip, load_instructblip_tokenizers) if run["task"] == "instructblip"
                             else (load_qwen2_audio, load_qwen2_audio_tokenizer))  # audio-qa: the whole Qwen2-Audio
    model = load(run["model"], language_model_dtype=run.get("language_model_dtype", "fp32"), quantize=run_quantization(run))
    heads = load_heads(model, checkpoint_dir / HEADS_FILE)
    if with_adapter:
        load_adapter(model, checkpoint_dir)
    hold_in_run_precision(model, precision, heads)
    return model.to(device).eval(), load_tokenizers(run["model"]), dict(run, precision=precision)


def answer_text(lm_tokenizer, ids: list[int], lm_config, eos_token_id: int | None = None) -> str:
    """Generated ids -> text: stop at the first eos (what follows is padding), decode without special
    tokens. T5's ids begin with the decoder start token, which is dropped; a decoder-only LM's generate
    (models/llama.py) returns the new tokens only, so nothing is dropped. eos: `eos_token_id` if given
    (the id the training answers ended with), else the language model config's."""
    eos = lm_config.eos_token_id if eos_token_id is None else eos_token_id
    eos = set(eos) if isinstance(eos, (tuple, list)) else {eos}
    answer = []
    for token in ids[0 if isinstance(lm_config, LlamaConfig) else 1:]:
        if token in eos:
            break
        answer.append(token)
    return lm_tokenizer.decode(answer, skip_special_tokens=True)


def normalize_answer(text: str) -> str:
    """What exact match compares: lowercase, single spaces, no trailing punctuation."""
    return " ".join(text.lower().split()).rstrip(".!?,;: ")


@torch.no_grad()
def evaluate_vqa(model, tokenizers, examples, batch_size=16, device="cpu", workers=0, autocast_dtype=None,
                 max_new_tokens=10, n_samples=5, progress=True) -> dict:
    """Token loss, perplexity and exact-match accuracy (percent) of greedy answers on VQA examples.

    Both language models: the loss is over the answer tokens (+ eos) either way; T5 generates from the
    prompt (input_ids), a decoder-only LM from the left-padded prompt alone (prompt_input_ids, since its
    input_ids also hold the answer), and stops at the tokenizer's </s>, which the answers were trained to end with."""
    qformer_tokenizer, lm_tokenizer = tokenizers
    decoder_only = model.config.decoder_only
    prompt_keys = ("prompt_input_ids", "prompt_attention_mask") if decoder_only else ("input_ids", "attention_mask")
    stop = dict(eos_token_id=lm_tokenizer.token_to_id(LLAMA_EOS)) if decoder_only else {}
    was_training = model.training
    model.eval()
    loader = DataLoader(
        VQADataset(examples, on_bad_image="fail"), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=functools.partial(collate_vqa, image_size=model.config.vision.image_size, qformer_tokenizer=qformer_tokenizer,
                                     lm_tokenizer=lm_tokenizer, decoder_only=decoder_only),
    )
    device_type = torch.device(device).type
    amp = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    loss_sum, n_tokens, correct, samples = 0.0, 0, 0, []
    with amp:
        for batch in tqdm(loader, desc="answer", unit="batch", disable=None if progress else True, leave=False):
            image = {k: batch[k].to(device) for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask")}
            labels = batch["labels"].to(device)
            real = int((labels != -100).sum())
            out = model(**image, input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), labels=labels)
            loss_sum += float(out.loss) * real  # token-weighted, as one big batch
            n_tokens += real
            generated = model.generate(**image, input_ids=batch[prompt_keys[0]].to(device),
                                       attention_mask=batch[prompt_keys[1]].to(device), max_new_tokens=max_new_tokens, **stop)
            for prompt, answer, ids in zip(batch["prompts"], batch["answers"], generated.tolist()):
                text = answer_text(lm_tokenizer, ids, model.language_model.config, **stop)
                correct += normalize_answer(text) == normalize_answer(answer)
                if len(samples) < n_samples:
                    samples.append({"prompt": prompt, "answer": answer, "generated": text})
    model.train(was_training)
    loss = loss_sum / max(1, n_tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "exact_match": 100.0 * correct / len(examples),
            "n_examples": len(examples), "samples": samples}


def format_vqa(metrics: dict, title: str = "") -> str:
    lines = [f"{title or 'answers'} ({metrics['n_examples']} examples): exact match {metrics['exact_match']:.2f}%, "
             f"answer loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}"]
    lines += [f"  Q: {s['prompt']}  A: {s['answer']}  generated: {s['generated']!r}" for s in metrics["samples"]]
    return "\n".join(lines)


# ---- search: a library of clips embedded once, ranked against a text query ------------------------

def rank_clips(audio: np.ndarray, query: np.ndarray, top: int) -> list[tuple[int, float]]:
    """(row, cosine similarity) of the `top` clips closest to the query, best first; ties keep file order."""
    scores = audio @ query  # (N,)
    order = np.argsort(-scores, kind="stable")[:top]
    return [(int(row), float(scores[row])) for row in order]


def search_command(args, model) -> list[dict]:
    """--search: rank the clips of --audio-dir (or of the --data manifest) against the query text."""
    if args.data:
        clips = read_manifest(args.data, audio_dir=args.audio_dir)
        source = Path(args.data)
        root = Path(args.audio_dir) if args.audio_dir else source.parent
        files = list(dict.fromkeys(clip.audio for clip in clips))
    else:
        source = root = Path(args.audio_dir)
        files = find_audio_files(root)
        if not files:
            raise ValueError(f"{root} holds no audio files (looked recursively for {', '.join(sorted(AUDIO_SUFFIXES))})")
    index_path = Path(args.index) if args.index else default_index_path(args.checkpoint, source, not args.no_adapter)
    audio, names = search_index(model, files, root, index_path, not args.no_adapter, args.batch_size, args.workers, feature_cache(args))
    query = model.embed_text([args.search]).numpy()[0]  # (E,)
    results = [{"rank": rank, "score": score, "path": names[row]}
               for rank, (row, score) in enumerate(rank_clips(audio, query, args.top), start=1)]
    print(f'"{args.search}": top {len(results)} of {len(names)} clips in {source} (cosine similarity)')
    for result in results:
        print(f"  {result['rank']:>3}  {result['score']:7.4f}  {result['path']}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"query": args.search, "results": results}, indent=2, ensure_ascii=False) + "\n")
    return results


# ---- zero-shot classification: class names as text prompts ----------------------------------------

DEFAULT_TEMPLATE = "the sound of {label}"
TOP_K = 5


def class_embeddings(model, classes: list[str], templates: list[str], batch_size=32) -> np.ndarray:
    """(C, E) unit-length text embeddings of the classes: each template filled with label_text(class),
    embedded, and, with several templates, averaged and renormalised (CLIP's prompt ensembling)."""
    prompts = [template.replace("{label}", label_text(name)) for name in classes for template in templates]
    text = model.embed_text(prompts, batch_size=batch_size).numpy()  # (C * T, E)
    text = text.reshape(len(classes), len(templates), -1).mean(axis=1)  # (C, T, E) -> (C, E)
    return text / np.linalg.norm(text, axis=-1, keepdims=True)


def zero_shot_metrics(similarity: np.ndarray, truth: np.ndarray, classes: list[str]) -> dict:
    """Top-1, top-5 and per-class top-1 accuracy (fractions) from (N, C) clip-class similarities.

    Classes are ranked by similarity, ties by class order (a stable sort); with fewer than 5
    classes, "top5" counts the top C, which is always 1.0.
    """
    order = np.argsort(-similarity, axis=1, kind="stable")  # (N, C) best first
    top1 = order[:, 0] == truth
    top5 = (order[:, :TOP_K] == truth[:, None]).any(axis=1)
    per_class = {name: float(top1[truth == c].mean()) for c, name in enumerate(classes) if (truth == c).any()}
    return {"accuracy": float(top1.mean()), "top5": float(top5.mean()), "per_class": per_class,
            "n": int(len(truth)), "n_classes": len(classes)}


def format_zero_shot(metrics: dict, counts: dict, title: str) -> str:
    width = max(len(name) for name in metrics["per_class"])
    lines = [f"{title} ({metrics['n']} clips, {metrics['n_classes']} classes): "
             f"top-1 {100 * metrics['accuracy']:.2f}%, top-5 {100 * metrics['top5']:.2f}%", "  per class (top-1):"]
    lines += [f"    {name:<{width}}  {counts[name]:>5} clips  {100 * accuracy:6.2f}%" for name, accuracy in metrics["per_class"].items()]
    return "\n".join(lines)


def zero_shot_command(args, model) -> dict:
    """--zero-shot: classify class-folder or CSV clips by their labels' prompts; print and return the accuracies."""
    templates = args.template or [DEFAULT_TEMPLATE]
    for template in templates:
        if "{label}" not in template:
            raise ValueError(f"--template {template!r} has no {{label}} where the class name goes")
    pairs = read_labelled_audio(args.zero_shot, audio_dir=args.audio_dir)
    problems = [(path, reason) for path, _ in pairs if (reason := unreadable(path))]
    if problems:
        for path, reason in problems[:10]:
            print(f"{path}: {reason}", file=sys.stderr)
        raise ValueError(f"{len(problems)} clip(s) of {args.zero_shot} cannot be read (listed above); evaluation needs every clip")
    classes = sorted({label for _, label in pairs})
    truth = np.array([classes.index(label) for _, label in pairs])  # (N,)
    audio = model.embed_audio([path for path, _ in pairs], batch_size=args.batch_size, workers=args.workers,
                              feature_cache=feature_cache(args)).numpy()
    text = class_embeddings(model, classes, templates, args.batch_size)
    metrics = zero_shot_metrics(audio @ text.T, truth, classes) | {"templates": templates}
    counts = {name: int((truth == c).sum()) for c, name in enumerate(classes)}
    title = f"zero-shot {Path(args.zero_shot).name}, {'no adapter' if args.no_adapter else 'with adapter'}, " \
            f"prompt{'s' if len(templates) > 1 else ''} {', '.join(map(repr, templates))}"
    print(format_zero_shot(metrics, counts, title))
    return metrics


def unreadable_error(problems: list, data: str, what: str) -> str:
    """Evaluation needs every example: the unreadable ones listed (up to 10) on stderr, and the error."""
    for item, reason in problems[:10]:
        print(f"{item.where}: {reason}: {getattr(item, what)}", file=sys.stderr)
    return f"{len(problems)} example(s) of {data} cannot be read (listed above); fix the manifest: evaluation needs every {what} file"


def feature_cache(args) -> FeatureCache | None:
    """The log-mel cache train.py fills (data/feature_cache.py), unless --no-feature-cache."""
    return None if args.no_feature_cache else FeatureCache(Path(args.cache_dir) / "features")


# ---- the command ------------------------------------------------------------------------------------

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
    parser = argparse.ArgumentParser(description="Evaluate, search with, or classify zero-shot with a train.py output directory.")
    parser.add_argument("--checkpoint", required=True, help="an output directory of train.py")
    parser.add_argument("--data", help="manifest (audio-text: JSONL or Clotho/AudioCaps CSV; instructblip: JSONL); default: the run's eval_data")
    parser.add_argument("--audio-dir", help="a folder of audio: with --search alone, the library searched (recursively); with --data or a "
                        "--zero-shot CSV, the folder relative audio paths point into (default: the manifest's or CSV's folder)")
    parser.add_argument("--json", help="write the metrics (or search results) here as JSON")
    parser.add_argument("--no-adapter", action="store_true", help="LoRA off (heads kept): what does the adapter add?")
    parser.add_argument("--precision", choices=list(AUTOCAST_DTYPES), help="default: the run's (run_config.json), which reproduces "
                        "training's numbers; bf16 holds frozen weights in bf16 under bf16 autocast, fp16 autocasts over fp32 weights")
    parser.add_argument("--save-embeddings", help="audio-text: write audio, text and text_audio_index arrays to this .npz")
    parser.add_argument("--search", metavar="TEXT", help="audio-text: print the clips of --audio-dir (or --data) closest to this text")
    parser.add_argument("--top", type=int, default=10, help="--search: how many clips to print")
    parser.add_argument("--index", metavar="F.npz", help="--search: where the library's embeddings are kept (default: search-index-<hash>.npz "
                        "in --checkpoint). A file's embedding is reused while its path (relative to the folder), size and modification "
                        "time are unchanged and the checkpoint is the same (its run_config.json, heads and adapter by content, the "
                        "precision, --no-adapter); new or changed files are embedded, vanished ones dropped")
    parser.add_argument("--zero-shot", metavar="ROOT_OR_CSV", help="audio-text: classify ROOT/<label>/*.wav (a folder per class) or a CSV "
                        "with filename,label columns; labels become prompts with '_' and '-' read as spaces")
    parser.add_argument("--template", action="append", help=f"--zero-shot: the prompt, {{label}} standing for the class name "
                        f"(default {DEFAULT_TEMPLATE!r}); repeat to average several prompts per class")
    parser.add_argument("--batch-size", type=int, help="clips or examples a forward (default: the run's --batch-size, as its "
                        "training-time evaluations used: padding to a batch's longest clip rounds differently in another batch)")
    parser.add_argument("--max-new-tokens", type=int, help="instructblip, audio-qa: longest generated answer (default: what "
                        "training evaluated with, 10 and 16)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding audio or images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", default=os.environ.get("LORA_MM_CACHE", str(Path.home() / ".cache" / "lora-mm")),
                        help="audio-text: the log-mel of each clip is read from (or kept in) <cache-dir>/features, as train.py does")
    parser.add_argument("--no-feature-cache", action="store_true", help="compute every clip's log-mel afresh (the same numbers)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a mistake the message explains")
    return parser


def run(parser: argparse.ArgumentParser, args) -> dict:
    """What main does once the flags are parsed."""
    if args.search and args.zero_shot:
        parser.error("--search and --zero-shot are separate modes: give one of them")
    if args.search and not (args.audio_dir or args.data):
        parser.error("--search needs the clips to search: --audio-dir DIR or --data MANIFEST")

    model, tokenizers, run = load_checkpoint(args.checkpoint, with_adapter=not args.no_adapter, precision=args.precision, device=args.device)
    args.batch_size = args.batch_size or run.get("batch_size", 32)
    if (args.search or args.zero_shot) and run["task"] != "audio-text":
        parser.error(f"--search and --zero-shot need an audio-text run; {args.checkpoint} is a {run['task']} run")
    try:
        if args.search:
            return search_command(args, model)
        if args.zero_shot:
            metrics = zero_shot_command(args, model)
            if args.json:
                atomic_write_text(args.json, json.dumps(metrics, indent=2) + "\n")
            return metrics
    except (FileNotFoundError, ValueError) as error:  # a library folder or CSV that cannot be read
        raise UserError(str(error)) from error

    data = args.data or run.get("eval_data")
    if not data:
        parser.error("--data is required: this run recorded no eval_data")
    label = f"{Path(data).name}, {'no adapter' if args.no_adapter else 'with adapter'}" + ("" if run["precision"] == "fp32" else f", {run['precision']}")
    if run["task"] == "instructblip":
        examples = read_vqa_manifest(data)
        if problems := check_images(examples):
            raise UserError(unreadable_error(problems, data, "image"))
        metrics = evaluate_vqa(model, tokenizers, examples, batch_size=args.batch_size, device=args.device, workers=args.workers,
                               autocast_dtype=autocast_dtype(run["precision"]), max_new_tokens=args.max_new_tokens or 10)
        print(format_vqa(metrics, label))
    elif run["task"] == "audio-qa":
        examples = read_audio_qa_manifest(data, args.audio_dir)
        if problems := check_audio(examples):
            raise UserError(unreadable_error(problems, data, "audio"))
        metrics = evaluate_audio_qa(model, tokenizers, examples, batch_size=args.batch_size, device=args.device, workers=args.workers,
                                    autocast_dtype=autocast_dtype(run["precision"]), max_new_tokens=args.max_new_tokens or 16,
                                    pad_to_30s=bool(run.get("pad_to_30s")))
        print(format_audio_qa(metrics, label))
    else:
        audio_dir = args.audio_dir or (None if args.data else run.get("eval_audio_dir"))  # where training found them
        clips, problems = precheck(read_manifest(data, audio_dir=audio_dir))
        if problems:
            raise UserError(unreadable_error(problems, data, "audio"))
        audio, text, text_audio_index = encode_clips(model, tokenizers, clips, batch_size=args.batch_size, workers=args.workers,
                                                     feature_cache=feature_cache(args))
        metrics = retrieval_metrics(text @ audio.T, text_audio_index)
        print(format_metrics(metrics, label))
        if args.save_embeddings:
            atomic_write(args.save_embeddings, functools.partial(save_npz, audio=audio, text=text, text_audio_index=text_audio_index))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=2) + "\n")
    return metrics



# ---- audio-qa: Qwen2-Audio answers, by greedy generation ------------------------------------------


def word_errors(hypothesis: str, reference: str) -> int:
    """Word-level Levenshtein distance (substitutions + insertions + deletions) of two normalized answers."""
    hyp, ref = normalize_answer(hypothesis).split(), normalize_answer(reference).split()
    row = list(range(len(hyp) + 1))  # distances from the empty reference prefix
    for i, word in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, guess in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != guess))
    return row[-1]


@torch.no_grad()
def evaluate_audio_qa(model, tokenizer, examples, batch_size=16, device="cpu", workers=0, autocast_dtype=None,
                      max_new_tokens=16, n_samples=5, progress=True, pad_to_30s=False, feature_cache=None) -> dict:
    """Answer loss (token-weighted over answer + <|im_end|> tokens), perplexity, exact match and word error
    rate (percent; WER = word edits / reference words over the whole set) of greedy answers generated from the
    left-padded prompts, stopping at <|im_end|> (data/audio_qa.py, models/qwen2_audio.py)."""
    stop = tokenizer.token_to_id(IM_END)
    was_training = model.training
    model.eval()
    loader = DataLoader(AudioQADataset(examples, on_bad_audio="fail", n_mels=model.audio_tower.config.num_mel_bins,
                                       feature_cache=feature_cache), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=functools.partial(collate_audio_qa, tokenizer=tokenizer, pad_to_30s=pad_to_30s))
    amp = torch.autocast(torch.device(device).type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    loss_sum, n_tokens, correct, edits, words, samples = 0.0, 0, 0, 0, 0, []
    with amp:
        for batch in tqdm(loader, desc="answer", unit="batch", disable=None if progress else True, leave=False):
            audio = {k: batch[k].to(device) for k in ("input_features", "feature_attention_mask")}
            labels = batch["labels"].to(device)
            real = int((labels != -100).sum())
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **audio, labels=labels)
            loss_sum += float(out.loss) * real  # token-weighted, as one big batch
            n_tokens += real
            generated = model.generate(input_ids=batch["prompt_input_ids"].to(device), attention_mask=batch["prompt_attention_mask"].to(device), **audio,
                                       max_new_tokens=max_new_tokens, eos_token_id=stop)
            for prompt, answer, ids in zip(batch["prompts"], batch["answers"], generated.tolist()):
                text = tokenizer.decode(ids[: ids.index(stop)] if stop in ids else ids, skip_special_tokens=True)
                correct += normalize_answer(text) == normalize_answer(answer)
                edits += word_errors(text, answer)
                words += len(normalize_answer(answer).split())
                if len(samples) < n_samples:
                    samples.append({"prompt": prompt, "answer": answer, "generated": text})
    model.train(was_training)
    loss = loss_sum / max(1, n_tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "exact_match": 100.0 * correct / len(examples),
            "wer": 100.0 * edits / max(1, words), "n_examples": len(examples), "samples": samples}


def format_audio_qa(metrics: dict, title: str = "") -> str:
    lines = [f"{title or 'answers'} ({metrics['n_examples']} examples): exact match {metrics['exact_match']:.2f}%, "
             f"WER {metrics['wer']:.2f}%, answer loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}"]
    lines += [f"  Q: {s['prompt']}  A: {s['answer']}  generated: {s['generated']!r}" for s in metrics["samples"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
