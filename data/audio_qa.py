"""Audio question answering batches for Qwen2-Audio instruction tuning (train.py --task audio-qa).

    manifest.jsonl, one object a line: {"audio": "clips/a.wav", "prompt": "How many beeps are there?",
                                        "answer": "three"}      (paths relative to the manifest)
      -> read_audio_qa_manifest: AudioQAExample(audio, prompt, answer, source, line), one a line
      -> AudioQADataset[i]: the clip's log-mel (`ClipFeatures`, models/audio.py), from the feature
                            cache (data/feature_cache.py) or decoded and checked    (DataLoader workers)
      -> collate_audio_qa:
           input_features (B, n_mels, T), feature_attention_mask (B, T)   the clips, padded to the
                                               longest + 2 frames (models/audio.py), or to 30 s
           input_ids / attention_mask (B, L)   chat_prompt(prompt) with its <|AUDIO|> written once per
                                               audio-tower output, then the answer and <|im_end|>;
                                               padded on the right
           labels (B, L)                       the answer and <|im_end|> where they sit; -100 on the
                                               prompt, the audio placeholders and the padding
           prompt_input_ids / prompt_attention_mask (B, Lp)   the prompt alone, padded on the LEFT,
                                               so generation continues each row after its own prompt
           padding_share                       padding / all tokens of input_ids
      -> collate_audio_qa(pack=N): the same examples end to end in rows of at most N tokens, with
           position_ids / segment_ids (R, W) for the block-diagonal attention (data/packing.py)

The chat format is Qwen2-Audio-7B-Instruct's (models/qwen2_audio.py `chat_prompt`); the answer is
tokenized on its own and <|im_end|> appended, the token the Instruct model ends its turns with and
where generation stops. Each clip's placeholder count is `audio_token_count(valid frames)`, what
transformers 5's processor writes, so the model's `place_audio` finds one row per placeholder.

Bad audio follows `on_bad_audio` as in data/audio_text.py: "fail" raises BadAudioError naming
`manifest:line`; "skip" yields a `Skipped(path, line, reason)` that the collate leaves out and lists
in batch["skipped"]. `check_audio` and `check_texts` find missing files and over-long texts before training.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data.audio_text import BAD_AUDIO_POLICIES, BadAudioError, Skipped, checked_clip_features, split_skipped
from data.feature_cache import CACHE_STATUSES, FeatureCache
from data.manifest import (BadLine, Media, entry_name, media_where, missing_keys, read_examples, readable_file_problem,
                           resolve_path)
from data.packing import pack_examples, padding_counts
from models.audio import AudioDecodeError, ClipFeatures, pad_clip_features
from models.qwen2_audio import AUDIO, IM_END, audio_token_count, chat_prompt, expand_audio_placeholder

REQUIRED_KEYS = ("audio", "prompt", "answer")
EXAMPLE_LINE = '{"audio": "clips/a.wav", "prompt": "How many beeps are there?", "answer": "three"}'
MAX_PROMPT_TOKENS = 512  # the chat template and the question, the audio placeholders not counted
MAX_ANSWER_TOKENS = 256  # the answer and its <|im_end|>


@dataclass(frozen=True)
class AudioQAExample:
    audio: Media  # an absolute Path (the same file from any working directory), or a RowRef / MemberRef
    prompt: str  # the question or instruction, not blank
    answer: str  # the target text, not blank
    source: str  # the manifest's path, for messages (or the table's, the shard's)
    line: int  # 1-based line in the manifest (0-based row or sample of a table or shard)

    @property
    def where(self) -> str:
        return media_where(self.audio, self.source, self.line)


def read_audio_qa_manifest(path, audio_dir=None, bad_lines: list[BadLine] | None = None) -> list[AudioQAExample]:
    """Parse a JSON Lines manifest into examples, one a line, in file order. Relative audio paths are
    resolved against `audio_dir`, default the manifest's folder. Lines naming the same clip stay separate
    examples (each asks its own question); other keys are ignored. A line that cannot be read (invalid
    JSON, a missing key, a blank, invisible or non-string value) is a ManifestError naming it, or, given a
    `bad_lines` list (a run under --on-bad-audio skip), a BadLine appended there."""
    base = Path(audio_dir) if audio_dir is not None else Path(path).parent

    def parse_row(row: dict, line_no: int) -> AudioQAExample:
        missing_keys(row, REQUIRED_KEYS, EXAMPLE_LINE)
        return AudioQAExample(resolve_path(base, row["audio"]), row["prompt"], row["answer"], str(path), line_no)

    return read_examples(path, parse_row, EXAMPLE_LINE, "an audio-qa", bad_lines)


def check_audio(examples: list[AudioQAExample]) -> list[tuple[AudioQAExample, str]]:
    """(example, problem) for each example whose audio file is missing, empty or has no readable header."""
    return [(example, problem) for example in examples if (problem := readable_file_problem(example.audio, "audio"))]


def prompt_and_answer_ids(tokenizer, prompt: str, answer: str | None) -> tuple[list[int], list[int]]:
    """(the chat prompt's ids with one <|AUDIO|>, the answer's ids + <|im_end|>, [] when answer is None).
    No special tokens are added: the template writes every one it needs itself."""
    prompt_ids = tokenizer.encode(chat_prompt(prompt), add_special_tokens=False).ids
    if answer is None:
        return prompt_ids, []
    return prompt_ids, tokenizer.encode(answer, add_special_tokens=False).ids + [tokenizer.token_to_id(IM_END)]


def _too_long(what: str, n_tokens: int, limit_name: str, limit: int) -> str:
    return f"the {what} is {n_tokens} tokens long, more than {limit_name}={limit}; shorten it"


def check_texts(examples: list[AudioQAExample], tokenizer, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                max_answer_tokens: int = MAX_ANSWER_TOKENS) -> list[tuple[AudioQAExample, str]]:
    """(example, problem) for each example whose prompt (in the chat template) or answer (+ <|im_end|>)
    exceeds its budget, or whose prompt itself holds <|AUDIO|>: run it before training, so a bad line
    far into the manifest fails now, naming its line, not hours later."""
    audio_id, problems = tokenizer.token_to_id(AUDIO), []
    for example in examples:
        prompt_ids, answer_ids = prompt_and_answer_ids(tokenizer, example.prompt, example.answer)
        if prompt_ids.count(audio_id) != 1:
            problems.append((example, f"the prompt itself holds {AUDIO}; the chat template places the clip"))
        elif len(prompt_ids) - 1 > max_prompt_tokens:
            problems.append((example, _too_long("prompt in the chat template", len(prompt_ids) - 1,
                                                "max_prompt_tokens", max_prompt_tokens)))
        elif len(answer_ids) > max_answer_tokens:
            problems.append((example, _too_long("answer", len(answer_ids), "max_answer_tokens", max_answer_tokens)))
    return problems


class AudioQADataset(Dataset):
    """One item an example: {"index", "features" (ClipFeatures), "prompt", "answer", "path", "line", "where",
    "cache"}, or a Skipped marker for bad audio when on_bad_audio="skip". With a feature_cache the log-mel
    of each clip is computed once; the numbers are the same without it."""

    def __init__(self, examples: list[AudioQAExample], on_bad_audio: str = "fail", *, n_mels: int,
                 feature_cache: FeatureCache | None = None):
        if on_bad_audio not in BAD_AUDIO_POLICIES:
            raise ValueError(f"on_bad_audio must be one of {BAD_AUDIO_POLICIES}, got {on_bad_audio!r}")
        if not examples:
            raise ValueError("AudioQADataset got no examples; check the manifest (and check_audio's report)")
        self.examples, self.on_bad_audio = list(examples), on_bad_audio
        self.n_mels, self.feature_cache = n_mels, feature_cache

    def __len__(self) -> int:
        return len(self.examples)

    def compute_features(self, example: AudioQAExample) -> ClipFeatures:
        return checked_clip_features(example.audio, example.where, self.n_mels)

    def __getitem__(self, key):
        index = key[1] if isinstance(key, tuple) else key  # (epoch, index) from WithEpoch: nothing here varies by epoch
        example = self.examples[index]
        try:
            if self.feature_cache is None:
                features, status = self.compute_features(example), None
            else:
                features, status = self.feature_cache.load_or_compute(example.audio, self.n_mels,
                                                                      lambda: self.compute_features(example))
        except (OSError, AudioDecodeError) as e:  # OSError: missing or unreadable file
            if self.on_bad_audio == "skip":
                return Skipped(str(example.audio), example.line, str(e))
            raise BadAudioError(f"{example.where}: {e}. Fix or remove this {entry_name(example.source)}, or pass "
                                "--on-bad-audio skip to leave such clips out and report them") from e
        return {"index": index, "features": features, "prompt": example.prompt, "answer": example.answer,
                "path": str(example.audio), "line": example.line, "where": example.where, "cache": status}


def pad_rows(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, L) and mask (B, L), padded to the longest on the right (or the left)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


def collate_audio_qa(items: list, tokenizer, pad_to_30s: bool = False, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                     max_answer_tokens: int = MAX_ANSWER_TOKENS, pack: int | None = None) -> dict:
    """Dataset items -> {"input_features": (B, n_mels, T) float32, "feature_attention_mask": (B, T) long,
    "input_ids" / "attention_mask" / "labels": (B, L) long, "prompt_input_ids" / "prompt_attention_mask":
    (B, Lp) long, "prompts", "answers", "paths": [B str], "lines": [B int], "index": (B,) long,
    "skipped": [Skipped, ...], "cache": {"hit", "miss", "recomputed"}, "padding_tokens", "lm_tokens": int,
    "padding_share": float (padding / all tokens of input_ids)} (see the module docstring). If every item was
    skipped, the tensors are None. `tokenizer`: the checkpoint's (models/qwen2_audio.py
    load_qwen2_audio_tokenizer); use functools.partial(collate_audio_qa, tokenizer=...) as a collate_fn.

    pack=N (tokens): padding-free rows (data/packing.py). input_ids / attention_mask / labels and the added
    "position_ids" / "segment_ids" are (R, W <= N), several examples a row; the model takes all five with
    the clips. Everything per example (the clips, prompt_input_ids, prompts, answers, paths, lines, index)
    lists the examples in the order the rows hold them, which is how place_audio finds each clip's
    placeholders; "order" gives that order as positions among the kept items."""
    kept, skipped = split_skipped(items, "collate_audio_qa")
    cache = {status: sum(item["cache"] == status for item in kept) for status in CACHE_STATUSES}
    if not kept:
        packed_keys = ("position_ids", "segment_ids") if pack is not None else ()
        return {key: None for key in ("input_features", "feature_attention_mask", "input_ids", "attention_mask",
                                      "labels", "prompt_input_ids", "prompt_attention_mask", *packed_keys)} | {
            "prompts": [], "answers": [], "paths": [], "lines": [], "index": torch.zeros(0, dtype=torch.long),
            "skipped": skipped, "cache": cache, "padding_tokens": 0, "lm_tokens": 0, "padding_share": 0.0}
    audio_id = tokenizer.token_to_id(AUDIO)
    pad_id = tokenizer.token_to_id("<|endoftext|>")  # Qwen's pad token; never read: masked, labels -100
    prompt_rows, answer_rows = [], []
    for item in kept:
        prompt_ids, answer_ids = prompt_and_answer_ids(tokenizer, item["prompt"], item["answer"])
        if len(prompt_ids) - 1 > max_prompt_tokens:
            raise ValueError(f"{item['where']}: " + _too_long("prompt in the chat template", len(prompt_ids) - 1,
                                                              "max_prompt_tokens", max_prompt_tokens))
        if len(answer_ids) > max_answer_tokens:
            raise ValueError(f"{item['where']}: " + _too_long("answer", len(answer_ids), "max_answer_tokens",
                                                              max_answer_tokens))
        # one placeholder per audio-tower output of this clip, as transformers 5's processor writes them
        prompt_rows.append(expand_audio_placeholder(prompt_ids, audio_id,
                                                    audio_token_count(item["features"].valid_frames)))
        answer_rows.append(answer_ids)
    token_rows = [p + a for p, a in zip(prompt_rows, answer_rows)]
    label_rows = [[-100] * len(p) + a for p, a in zip(prompt_rows, answer_rows)]
    if pack is None:
        input_ids, attention_mask = pad_rows(token_rows, pad_id)  # (B, L)
        labels, _ = pad_rows(label_rows, -100)
        text = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        text |= padding_counts(attention_mask)
    else:
        packed = pack_examples(token_rows, label_rows, pack, pad_id, names=[item["where"] for item in kept])
        kept, prompt_rows = [kept[i] for i in packed.order], [prompt_rows[i] for i in packed.order]  # reading order
        text = packed.batch_fields()
    features, frame_mask = pad_clip_features([item["features"] for item in kept], pad_to_30s)  # (B, n_mels, T), (B, T)
    prompt_ids, prompt_mask = pad_rows(prompt_rows, pad_id, left=True)
    return {
        "input_features": features,
        "feature_attention_mask": frame_mask.long(),
        **text,
        "prompt_input_ids": prompt_ids,  # (B, Lp), left-padded
        "prompt_attention_mask": prompt_mask,
        "prompts": [item["prompt"] for item in kept],
        "answers": [item["answer"] for item in kept],
        "paths": [item["path"] for item in kept],
        "lines": [item["line"] for item in kept],
        "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "skipped": skipped,
        "cache": cache,
    }
