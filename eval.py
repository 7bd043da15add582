"""Evaluate a train.py output directory: retrieval (audio-text) or answers (instructblip).

    python eval.py --checkpoint runs/demo --data eval.jsonl [--json OUT.json] [--no-adapter]
                   [--save-embeddings OUT.npz]

instructblip: token loss and perplexity of the reference answers, and exact-match accuracy of the
greedy answers (lowercased, trimmed, trailing punctuation dropped), with sample generations.

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
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.audio_text import AudioTextDataset, captions_flat, collate_audio_text, precheck
from data.instructblip import VQADataset, check_images, collate_vqa, read_vqa_manifest
from data.manifest import read_manifest
from lora import load_adapter
from lora.atomic import atomic_write, atomic_write_text
from models import load_instructblip, load_instructblip_tokenizers, load_tokenizer
from models.audio_text import build_audio_text_model, load_heads
from models.tokenizer import tokenize

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


@torch.no_grad()
def encode_clips(model, tokenizer, clips, batch_size=32, pad_to_30s=False, device="cpu", workers=0, autocast_dtype=None, progress=True):
    """Embed every clip and every caption: (audio (N_audio, E), text (N_text, E), text_audio_index (N_text,)).

    Every caption of every clip is a query (captions_flat); a bad file is an error here, since a
    dropped clip would shift the caption-to-clip index.
    """
    was_training = model.training
    model.eval()
    n_mels = model.audio_tower.config.num_mel_bins
    loader = DataLoader(
        AudioTextDataset(clips, on_bad_audio="fail"), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=functools.partial(collate_audio_text, n_mels=n_mels, pad_to_30s=pad_to_30s),
    )
    device_type = torch.device(device).type
    amp = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    audio, text = [], []
    with amp:
        for batch in tqdm(loader, desc="embed audio", unit="batch", disable=None if progress else True, leave=False):
            audio.append(model.encode_audio(batch["features"].to(device), batch["frame_mask"].to(device)).float().cpu())
        texts, text_audio_index = captions_flat(clips)
        for start in tqdm(range(0, len(texts), batch_size), desc="embed text", unit="batch", disable=None if progress else True, leave=False):
            input_ids, attention_mask = tokenize(tokenizer, texts[start : start + batch_size])
            text.append(model.encode_text(input_ids.to(device), attention_mask.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(audio).numpy(), torch.cat(text).numpy(), np.asarray(text_audio_index)


def evaluate(model, tokenizer, clips, **kwargs) -> dict:
    """retrieval_metrics of the model on these clips (all captions)."""
    audio, text, text_audio_index = encode_clips(model, tokenizer, clips, **kwargs)
    return retrieval_metrics(text @ audio.T, text_audio_index)


def read_run_config(checkpoint_dir) -> dict:
    config_path = Path(checkpoint_dir) / "run_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: --checkpoint must be an output directory of train.py")
    return json.loads(config_path.read_text(encoding="utf-8"))


def load_run(checkpoint_dir, with_adapter: bool = True):
    """Rebuild a trained model from an output directory of train.py: (model, tokenizers, run_config).

    audio-text: tokenizers is the text tower's tokenizer; instructblip: (Q-Former, T5) tokenizers.
    """
    checkpoint_dir = Path(checkpoint_dir)
    run = read_run_config(checkpoint_dir)
    if run.get("task") == "audio-text":
        model = build_audio_text_model(run["audio_model"], run["text_model"], run["embed_dim"], seed=run["seed"])
        tokenizers = load_tokenizer(run["text_model"])
    elif run.get("task") == "instructblip":
        model = load_instructblip(run["model"], language_model_dtype=run.get("language_model_dtype", "fp32"))
        tokenizers = load_instructblip_tokenizers(run["model"])
    else:
        raise ValueError(f"{checkpoint_dir / 'run_config.json'}: unknown task {run.get('task')!r}")
    load_heads(model, checkpoint_dir / "heads.safetensors")
    if with_adapter:
        load_adapter(model, checkpoint_dir)
    return model.eval(), tokenizers, run


def answer_text(t5_tokenizer, ids: list[int], t5_config) -> str:
    """Generated ids -> text: drop the decoder start token, stop at the first eos (what follows is
    padding), and decode without special tokens."""
    eos = t5_config.eos_token_id
    eos = set(eos) if isinstance(eos, (tuple, list)) else {eos}
    answer = []
    for token in ids[1:]:
        if token in eos:
            break
        answer.append(token)
    return t5_tokenizer.decode(answer, skip_special_tokens=True)


def normalize_answer(text: str) -> str:
    """What exact match compares: lowercase, single spaces, no trailing punctuation."""
    return " ".join(text.lower().split()).rstrip(".!?,;: ")


@torch.no_grad()
def evaluate_vqa(model, tokenizers, examples, batch_size=16, device="cpu", workers=0, autocast_dtype=None,
                 max_new_tokens=10, n_samples=5, progress=True) -> dict:
    """Token loss, perplexity and exact-match accuracy (percent) of greedy answers on VQA examples."""
    qformer_tokenizer, t5_tokenizer = tokenizers
    was_training = model.training
    model.eval()
    loader = DataLoader(
        VQADataset(examples, on_bad_image="fail"), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=functools.partial(collate_vqa, image_size=model.config.vision.image_size,
                                     qformer_tokenizer=qformer_tokenizer, t5_tokenizer=t5_tokenizer),
    )
    device_type = torch.device(device).type
    amp = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    loss_sum, n_tokens, correct, samples = 0.0, 0, 0, []
    with amp:
        for batch in tqdm(loader, desc="answer", unit="batch", disable=None if progress else True, leave=False):
            inputs = {k: batch[k].to(device) for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask")}
            labels = batch["labels"].to(device)
            real = int((labels != -100).sum())
            loss_sum += float(model(**inputs, labels=labels).loss) * real  # token-weighted, as one big batch
            n_tokens += real
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens)
            for prompt, answer, ids in zip(batch["prompts"], batch["answers"], generated.tolist()):
                text = answer_text(t5_tokenizer, ids, model.language_model.config)
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


def save_npz(path, **arrays):
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
        np.savez(f, **arrays)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a train.py output directory on a manifest.")
    parser.add_argument("--checkpoint", required=True, help="an output directory of train.py")
    parser.add_argument("--data", help="manifest (audio-text: JSONL or Clotho/AudioCaps CSV; instructblip: JSONL); default: the run's eval_data")
    parser.add_argument("--json", help="write the metrics here as JSON")
    parser.add_argument("--no-adapter", action="store_true", help="LoRA off (heads kept): what does the adapter add?")
    parser.add_argument("--save-embeddings", help="audio-text: write audio, text and text_audio_index arrays to this .npz")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=10, help="instructblip: longest generated answer")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding audio or images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model, tokenizers, run = load_run(args.checkpoint, with_adapter=not args.no_adapter)
    data = args.data or run.get("eval_data")
    if not data:
        parser.error("--data is required: this run recorded no eval_data")
    model.to(args.device)
    label = f"{Path(data).name}, {'no adapter' if args.no_adapter else 'with adapter'}"
    if run["task"] == "instructblip":
        examples = read_vqa_manifest(data)
        problems = check_images(examples)
        if problems:
            for example, reason in problems[:10]:
                print(f"{example.where}: {reason}: {example.image}", file=sys.stderr)
            sys.exit(f"{len(problems)} example(s) of {data} cannot be read; fix the manifest (evaluation needs every image)")
        metrics = evaluate_vqa(model, tokenizers, examples, batch_size=args.batch_size, device=args.device,
                               workers=args.workers, max_new_tokens=args.max_new_tokens)
        print(format_vqa(metrics, label))
    else:
        clips, problems = precheck(read_manifest(data))
        if problems:
            for clip, reason in problems[:10]:
                print(f"{clip.where}: {reason}: {clip.audio}", file=sys.stderr)
            sys.exit(f"{len(problems)} clip(s) of {data} cannot be read; fix the manifest (evaluation needs every clip)")
        audio, text, text_audio_index = encode_clips(
            model, tokenizers, clips, batch_size=args.batch_size, pad_to_30s=run.get("pad_to_30s", False), device=args.device, workers=args.workers
        )
        metrics = retrieval_metrics(text @ audio.T, text_audio_index)
        print(format_metrics(metrics, label))
        if args.save_embeddings:
            atomic_write(args.save_embeddings, functools.partial(save_npz, audio=audio, text=text, text_audio_index=text_audio_index))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()
