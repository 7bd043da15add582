"""InstructBLIP batches: a VQA manifest -> images, prompts and answers -> the tensors the model takes.

    manifest.jsonl, one object a line: {"image": "images/a.png", "prompt": "What colour is it?",
                                        "answer": "red"}       (paths relative to the manifest)
      -> read_vqa_manifest: VQAExample(image, prompt, answer, source, line), one a line
      -> VQADataset[i]:     decode the image (models/image.py `load_image`)  (runs in DataLoader workers)
      -> collate_vqa:       pixel_values (B, 3, S, S)              -> vision_model
                            qformer_input_ids/attention_mask       -> qformer, beside the query tokens
                            input_ids/attention_mask (T5)          -> T5 encoder, after the projected queries
                            labels (T5, answer + </s>, pads -100)  -> T5 decoder and the LM loss

The prompt is tokenized twice, as in InstructBLIP: the Q-Former reads it with its own BERT
WordPiece (so the queries extract what the instruction asks about), and T5 reads it with its
SentencePiece after the projected queries. Unlike audio-text manifests, lines naming the same
image stay separate examples: each asks its own question.

Bad images follow `on_bad_image`, with the conventions of data/audio_text.py: "fail" (default)
raises BadImageError naming `manifest:line` and the way to skip; "skip" turns the item into a
`Skipped(path, line, reason)` that the collate leaves out and lists in batch["skipped"], for the
training loop to count and print. Batch order and resuming reuse `ResumableBatchSampler`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data.audio_text import Skipped, split_skipped
# the manifest helpers are shared on purpose: the same UTF-8 errors and path rules for both tasks
from data.manifest import JSON_SUFFIXES, ManifestError, file_problem, json_lines, read_utf8, resolve_path
from models.image import load_image, preprocess_images
from models.tokenizer import tokenize

BAD_IMAGE_POLICIES = ("fail", "skip")
REQUIRED_KEYS = ("image", "prompt", "answer")
EXAMPLE_LINE = '{"image": "images/a.png", "prompt": "What colour is the shape?", "answer": "red"}'
T5_EOS = "</s>"  # T5's end of sequence: the labels must end with it, or generation never learns to stop
# LAVIS's InstructBLIP limits (max_txt_len, max_output_txt_len); LAVIS truncates silently, we refuse
MAX_PROMPT_TOKENS = 128
MAX_ANSWER_TOKENS = 256


class BadImageError(RuntimeError):
    """An image file that cannot be used, with on_bad_image="fail"."""


@dataclass(frozen=True)
class VQAExample:
    image: Path  # absolute, so an example means the same file from any working directory
    prompt: str  # the instruction or question, not blank
    answer: str  # the target text, not blank
    source: str  # the manifest's path, for messages
    line: int  # 1-based line in the manifest

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_vqa_manifest(path, image_dir=None) -> list[VQAExample]:
    """Parse a JSON Lines VQA manifest into examples, one a line, in file order. Relative image
    paths are resolved against `image_dir`, which defaults to the manifest's folder. Other keys
    are ignored; whitespace-only lines are layout and skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix.lower() not in JSON_SUFFIXES:
        raise ManifestError(f"{path}: unknown manifest suffix {path.suffix!r}; an InstructBLIP manifest "
                            f"is .jsonl (or .json) with one JSON object a line, such as {EXAMPLE_LINE}")
    base = Path(image_dir) if image_dir is not None else path.parent
    examples = [_parse_row(row, where, base, str(path), line_no)
                for line_no, where, row in json_lines(path, read_utf8(path), EXAMPLE_LINE)]
    if not examples:
        raise ManifestError(f"{path}: the manifest holds no examples; add lines such as {EXAMPLE_LINE}")
    return examples


def _parse_row(row: dict, where: str, base: Path, source: str, line_no: int) -> VQAExample:
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        hint = ' (rename "question" to "prompt")' if "prompt" in missing and "question" in row else ""
        raise ManifestError(f"{where}: missing {', '.join(map(json.dumps, missing))}{hint}; every line needs "
                            f"the keys {', '.join(map(json.dumps, REQUIRED_KEYS))}, as in {EXAMPLE_LINE}")
    for key in REQUIRED_KEYS:
        value = row[key]
        if not isinstance(value, str):
            raise ManifestError(f'{where}: "{key}" must be a string, got {type(value).__name__} {value!r:.60}')
        if not value.strip():
            raise ManifestError(f'{where}: "{key}" is empty; fill it in or remove the line')
    return VQAExample(resolve_path(base, row["image"]), row["prompt"], row["answer"], source, line_no)


def check_images(examples: list[VQAExample]) -> list[tuple[VQAExample, str]]:
    """(example, problem) for each example whose image file is missing or empty."""
    return [(example, problem) for example in examples if (problem := file_problem(example.image, "image"))]


class VQADataset(Dataset):
    """One item an example: {"index", "image" (an RGB PIL image), "prompt", "answer", "path",
    "line", "where"}, or a Skipped marker for a bad image when on_bad_image="skip"."""

    def __init__(self, examples: list[VQAExample], on_bad_image: str = "fail"):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        if not examples:
            raise ValueError("VQADataset got no examples; check the manifest (and check_images' report)")
        self.examples = list(examples)
        self.on_bad_image = on_bad_image

    def set_epoch(self, epoch: int) -> None:
        """Nothing varies by epoch here (one fixed answer per example); the training loop calls it
        on every dataset, as AudioTextDataset draws its caption from the epoch."""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        example = self.examples[index]
        try:
            image = load_image(example.image)
        except (OSError, ValueError) as e:  # OSError: missing or unreadable; ValueError: not an image
            if self.on_bad_image == "skip":
                return Skipped(str(example.image), example.line, str(e))
            raise BadImageError(f"{example.where}: {e}. Fix or remove this manifest line, or pass "
                                "on_bad_image='skip' (train.py --on-bad-image skip) to leave such "
                                "images out and report them") from e
        return {"index": index, "image": image, "prompt": example.prompt, "answer": example.answer,
                "path": str(example.image), "line": example.line, "where": example.where}


def _tokenize_checked(tokenizer, texts: list[str], items: list[dict], max_tokens: int, limit_name: str, what: str):
    """tokenize(), refusing any text longer than `max_tokens` (special tokens included): a cut
    prompt asks another question, and a cut answer trains a wrong target."""
    ids, mask = tokenize(tokenizer, texts)  # (B, L), (B, L), padded to the batch's longest
    for item, n_tokens in zip(items, mask.sum(dim=1).tolist()):
        if n_tokens > max_tokens:
            raise ValueError(f"{item['where']}: the {what} is {n_tokens} tokens long, more than "
                             f"{limit_name}={max_tokens}; shorten it, or raise {limit_name} if the "
                             "model's positions allow it")
    return ids, mask


def collate_vqa(items: list, image_size: int, qformer_tokenizer, t5_tokenizer,
                max_prompt_tokens: int = MAX_PROMPT_TOKENS, max_answer_tokens: int = MAX_ANSWER_TOKENS) -> dict:
    """Dataset items -> {"pixel_values": (B, 3, S, S) float32, "qformer_input_ids" / "qformer_attention_mask":
    (B, Lq) long, "input_ids" / "attention_mask": (B, Lp) long, "labels": (B, La) long with -100 on padding,
    "prompts", "answers", "paths": [B str], "lines": [B int], "index": (B,) long, "skipped": [Skipped, ...]}.
    Token tensors are padded to the batch's longest text. If every item was skipped, the tensor
    entries are None (and "index" is empty).

    The tokenizers are `tokenizers.Tokenizer`s with padding enabled (models/tokenizer.py); the T5
    one must append </s> (Flan-T5's template "$A </s>"). Use `functools.partial(collate_vqa,
    image_size=..., qformer_tokenizer=..., t5_tokenizer=...)` as a DataLoader's collate_fn:
    Tokenizer objects pickle, so workers get their own copies.
    """
    kept, skipped = split_skipped(items, "collate_vqa")
    if not kept:
        return {"pixel_values": None, "qformer_input_ids": None, "qformer_attention_mask": None,
                "input_ids": None, "attention_mask": None, "labels": None, "prompts": [], "answers": [],
                "paths": [], "lines": [], "index": torch.zeros(0, dtype=torch.long), "skipped": skipped}

    prompts, answers = [item["prompt"] for item in kept], [item["answer"] for item in kept]
    qformer_ids, qformer_mask = _tokenize_checked(qformer_tokenizer, prompts, kept, max_prompt_tokens,
                                                  "max_prompt_tokens", "prompt in Q-Former tokens")
    input_ids, attention_mask = _tokenize_checked(t5_tokenizer, prompts, kept, max_prompt_tokens,
                                                  "max_prompt_tokens", "prompt in T5 tokens")
    answer_ids, answer_mask = _tokenize_checked(t5_tokenizer, answers, kept, max_answer_tokens,
                                                "max_answer_tokens", "answer in T5 tokens")

    eos_id = t5_tokenizer.token_to_id(T5_EOS)
    last_tokens = [row[mask.bool()][-1].item() for row, mask in zip(answer_ids, answer_mask)]  # either padding side
    if eos_id is None or any(token != eos_id for token in last_tokens):
        raise ValueError(f"the T5 tokenizer does not end the answers with {T5_EOS}, so the model would "
                         f"never learn to stop generating; use a tokenizer whose post-processor is the "
                         f"template '$A {T5_EOS}' (Flan-T5's tokenizer.json has it)")
    # -100 is the ignore_index of cross_entropy: padding contributes no loss. The mask, not
    # `ids == pad_id` as LAVIS does, decides: a tokenizer may pad with an id it also uses for text.
    labels = answer_ids.masked_fill(answer_mask == 0, -100)  # (B, La)

    return {
        "pixel_values": preprocess_images([item["image"] for item in kept], image_size),  # (B, 3, S, S)
        "qformer_input_ids": qformer_ids,
        "qformer_attention_mask": qformer_mask,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompts": prompts,
        "answers": answers,
        "paths": [item["path"] for item in kept],
        "lines": [item["line"] for item in kept],
        "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "skipped": skipped,
    }
