"""InstructBLIP batches: a VQA manifest -> images, prompts and answers -> the tensors the model takes.

    manifest.jsonl, one object a line: {"image": "images/a.png", "prompt": "What colour is it?",
                                        "answer": "red"}       (paths relative to the manifest)
      -> read_vqa_manifest: VQAExample(image, prompt, answer, source, line), one a line
      -> VQADataset[i]:     decode the image (models/image.py `load_image`)  (runs in DataLoader workers)
      -> collate_vqa:       pixel_values (B, 3, S, S)              -> vision_model
                            qformer_input_ids/attention_mask       -> qformer, beside the query tokens
           T5 (flan-t5):    input_ids/attention_mask (prompt)      -> T5 encoder, after the projected queries
                            labels (answer + </s>, pads -100)      -> T5 decoder and the LM loss
           LLaMA family:    input_ids/attention_mask               -> [BOS prompt answer eos], padded on the right
                            labels (same positions; -100 on the prompt and the padding) -> next-token loss
                            prompt_input_ids/prompt_attention_mask -> [BOS prompt], padded on the LEFT, for generate
           LLaMA, pack=N:   the examples [Q query slots; BOS prompt answer eos] end to end in rows of at most N
                            tokens, with position_ids/segment_ids (data/packing.py)

The prompt is tokenized twice, as in InstructBLIP: the Q-Former reads it with its own BERT
WordPiece (so the queries extract what the instruction asks about), and the language model reads it
with its own tokenizer after the projected queries. Unlike audio-text manifests, lines naming the
same image stay separate examples: each asks its own question.

Which layout a batch gets is read from the language model's tokenizer (`language_model_layout`):
T5's appends </s> to every text, LLaMA's puts a BOS in front and no </s> after; `decoder_only`
states it explicitly and is then checked against the tokenizer. For the decoder-only LM the answer
is tokenized on its own (no BOS), then the model's eos appended, as LAVIS's `blip2_vicuna_instruct` does;
BOS and eos come from `special_tokens` (models/tokenizer.py SpecialTokens: Llama 3's <|begin_of_text|> and
<|eot_id|>, SmolLM2's none and <|im_end|>, ...), by default Vicuna's (the tokenizer's BOS, </s>).

Token budgets: `check_texts` measures every line's prompt and answer before training, returning
(example, reason) like `check_images`, so the run can fail naming the line or skip it; the collate
refuses an over-long text again, as a last guard.

Bad images follow `on_bad_image`, with the conventions of data/audio_text.py: "fail" (default)
raises BadImageError naming `manifest:line` and the way to skip; "skip" turns the item into a
`Skipped(path, line, reason)` that the collate leaves out and lists in batch["skipped"], for the
training loop to count and print. Batch order and resuming: data/sampling.py `GlobalBatchSampler`.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from common.errors import UserError
from data.audio_text import Skipped, split_skipped
# the manifest helpers are shared on purpose: the same UTF-8 errors and path rules for both tasks
from data.manifest import (BadLine, Media, entry_name, media_where, missing_keys, read_examples, readable_file_problem,
                           resolve_path)
from data.packing import pack_examples, padding_counts
from data.refs import media_input
from models.image import load_image, preprocess_images
from models.instructblip import QUERY_SLOT
# each answer ends with its EOS, or generation never learns to stop; LLAMA_EOS is re-exported (the evaluation reads it)
from models.tokenizer import LLAMA_EOS, T5_EOS, SpecialTokens, read_special_tokens, tokenize

BAD_IMAGE_POLICIES = ("fail", "skip")
REQUIRED_KEYS = ("image", "prompt", "answer")
EXAMPLE_LINE = '{"image": "images/a.png", "prompt": "What colour is the shape?", "answer": "red"}'
# LAVIS's InstructBLIP limits (max_txt_len, max_output_txt_len); LAVIS truncates silently, we refuse
MAX_PROMPT_TOKENS = 128
MAX_ANSWER_TOKENS = 256
NUM_QUERY_TOKENS = 32  # Q of every released InstructBLIP: the rows of the language model's input before the text


class BadImageError(UserError, RuntimeError):
    """An image file that cannot be used, with on_bad_image="fail"."""


@dataclass(frozen=True)
class VQAExample:
    image: Media  # an absolute Path (the same file from any working directory), or a RowRef / MemberRef
    prompt: str  # the instruction or question, not blank
    answer: str  # the target text, not blank
    source: str  # the manifest's path, for messages (or the table's, the shard's)
    line: int  # 1-based line in the manifest (0-based row or sample of a table or shard)

    @property
    def where(self) -> str:
        return media_where(self.image, self.source, self.line)


def read_vqa_manifest(path, image_dir=None, bad_lines: list[BadLine] | None = None) -> list[VQAExample]:
    """Parse a JSON Lines VQA manifest into examples, one a line, in file order. Relative image
    paths are resolved against `image_dir`, which defaults to the manifest's folder. Other keys
    are ignored; whitespace-only lines are layout and skipped. A line that cannot be read (invalid
    JSON, a missing key, a blank, invisible or non-string value) is a ManifestError naming it, or,
    given a `bad_lines` list (a run under --on-bad-image skip), a BadLine appended there."""
    base = Path(image_dir) if image_dir is not None else Path(path).parent

    def parse_row(row: dict, line_no: int) -> VQAExample:
        missing_keys(row, REQUIRED_KEYS, EXAMPLE_LINE)
        return VQAExample(resolve_path(base, row["image"]), row["prompt"], row["answer"], str(path), line_no)

    return read_examples(path, parse_row, EXAMPLE_LINE, "an InstructBLIP", bad_lines)


def check_images(examples: list[VQAExample]) -> list[tuple[VQAExample, str]]:
    """(example, problem) for each example whose image file is missing, empty or has no readable header."""
    return [(example, problem) for example in examples if (problem := readable_file_problem(example.image, "image"))]


def language_model_layout(tokenizer) -> str:
    """"encoder-decoder" if the tokenizer ends every text with </s> (T5's template "$A </s>": the prompt
    feeds the encoder, the answer the decoder); "decoder-only" if it starts every text with a special
    token and does not end it with </s> (LLaMA's "<s> $A": prompt and answer form one sequence)."""
    encoding = tokenizer.encode("a")
    eos_id = tokenizer.token_to_id(T5_EOS)
    if eos_id is not None and encoding.ids[-1:] == [eos_id]:
        return "encoder-decoder"
    if encoding.special_tokens_mask[:1] == [1]:
        return "decoder-only"
    raise ValueError(f"the language model's tokenizer does not end the answers with {T5_EOS} (T5's template "
                     f"'$A {T5_EOS}', as Flan-T5's tokenizer.json has it) nor start every text with a BOS (LLaMA's "
                     "'<s> $A'), so it is neither layout: the model would never learn to stop generating; "
                     "use the checkpoint's own tokenizer.json")


def resolve_layout(lm_tokenizer, decoder_only: bool | None, special_tokens: SpecialTokens | None = None) -> str:
    """The tokenizer's layout, which must agree with `decoder_only` when that is given. A decoder whose prompts take
    no BOS (Qwen2, SmolLM2) is known by `decoder_only=True` or by its `special_tokens`, which only decoders have."""
    if special_tokens is not None:
        if decoder_only is False:
            raise ValueError("decoder_only=False but special_tokens were given: they belong to a decoder-only language "
                             "model; pass neither for T5")
        decoder_only = True
    if decoder_only and lm_tokenizer.encode("a").ids[-1:] != [lm_tokenizer.token_to_id(T5_EOS)]:
        return "decoder-only"
    layout = language_model_layout(lm_tokenizer)
    if decoder_only is not None and (layout == "decoder-only") != decoder_only:
        raise ValueError(f"decoder_only={decoder_only} but the language model's tokenizer is {layout} "
                         "(T5 appends </s>, LLaMA prepends a BOS): tokenizer and model come from different checkpoints")
    return layout


def _untruncated(tokenizer):
    """A copy that neither truncates nor pads, to measure true lengths."""
    copy = type(tokenizer).from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _too_long(what: str, n_tokens: int, limit_name: str, limit: int) -> str:
    return (f"the {what} is {n_tokens} tokens long, more than {limit_name}={limit}; shorten it, or "
            f"raise {limit_name} if the model's positions allow it")


def check_texts(examples: list[VQAExample], qformer_tokenizer, lm_tokenizer, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                max_answer_tokens: int = MAX_ANSWER_TOKENS, decoder_only: bool | None = None,
                special_tokens: SpecialTokens | None = None) -> list[tuple[VQAExample, str]]:
    """(example, problem) for each example whose prompt or answer exceeds its token budget (the problem
    names neither file nor line: the caller prints `example.where`, as for check_images), measured
    as collate_vqa will (special tokens and the answer's eos included, nothing truncated): run it on
    the whole manifest before training, so a long line 40 000 examples in fails now, not hours later."""
    layout = resolve_layout(lm_tokenizer, decoder_only, special_tokens)
    lm_name = "T5" if layout == "encoder-decoder" else "LLaMA"
    qformer, lm = _untruncated(qformer_tokenizer), _untruncated(lm_tokenizer)
    prompts, answers = [e.prompt for e in examples], [e.answer for e in examples]
    qformer_lengths = [len(e.ids) for e in qformer.encode_batch(prompts)]
    if layout == "encoder-decoder":
        prompt_lengths = [len(e.ids) for e in lm.encode_batch(prompts)]
        answer_lengths = [len(e.ids) for e in lm.encode_batch(answers)]  # </s> comes from the template
    else:
        bos = decoder_special_tokens(lm_tokenizer, special_tokens).bos_id is not None
        prompt_lengths = [len(e.ids) + bos for e in lm.encode_batch(prompts, add_special_tokens=False)]  # BOS + prompt
        answer_lengths = [len(e.ids) + 1 for e in lm.encode_batch(answers, add_special_tokens=False)]  # + eos
    problems = []
    for example, n_qformer, n_prompt, n_answer in zip(examples, qformer_lengths, prompt_lengths, answer_lengths):
        checks = [(n_qformer, "prompt in Q-Former tokens", "max_prompt_tokens", max_prompt_tokens),
                  (n_prompt, f"prompt in {lm_name} tokens", "max_prompt_tokens", max_prompt_tokens),
                  (n_answer, f"answer in {lm_name} tokens", "max_answer_tokens", max_answer_tokens)]
        reason = next((_too_long(what, n, name, limit) for n, what, name, limit in checks if n > limit), None)
        if reason:
            problems.append((example, reason))
    return problems


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

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key):
        index = key[1] if isinstance(key, tuple) else key  # (epoch, index) from WithEpoch: nothing here varies by epoch
        example = self.examples[index]
        try:
            image = load_image(media_input(example.image), name=str(example.image))  # a path, or embedded bytes
        except (OSError, ValueError) as e:  # OSError: missing or unreadable; ValueError: not an image
            if self.on_bad_image == "skip":
                return Skipped(str(example.image), example.line, str(e))
            raise BadImageError(f"{example.where}: {e}. Fix or remove this {entry_name(example.source)}, or pass "
                                "--on-bad-image skip to leave such images out and report them") from e
        return {"index": index, "image": image, "prompt": example.prompt, "answer": example.answer,
                "path": str(example.image), "line": example.line, "where": example.where}


def _tokenize_checked(tokenizer, texts: list[str], items: list[dict], max_tokens: int, limit_name: str, what: str):
    """tokenize(), refusing any text longer than `max_tokens` (special tokens included): a cut
    prompt asks another question, and a cut answer trains a wrong target."""
    ids, mask = tokenize(tokenizer, texts)  # (B, L), (B, L), padded to the batch's longest
    for item, n_tokens in zip(items, mask.sum(dim=1).tolist()):
        if n_tokens > max_tokens:
            raise ValueError(f"{item['where']}: {_too_long(what, n_tokens, limit_name, max_tokens)}")
    return ids, mask


def _real_ids(encoding) -> list[int]:
    """An encoding's ids without the padding the tokenizer added (on whichever side)."""
    return [i for i, m in zip(encoding.ids, encoding.attention_mask) if m]


def _pad(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, L) and mask (B, L), padded to the longest on the right (or left)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


def decoder_special_tokens(lm_tokenizer, special_tokens: SpecialTokens | None) -> SpecialTokens:
    """`special_tokens` (models/loading.py `load_special_tokens`) if given, else what the tokenizer alone shows:
    its post-processor's BOS and </s> as eos, which is InstructBLIP-Vicuna's (LAVIS: BOS = eos = </s>)."""
    if special_tokens is not None:
        return special_tokens
    if lm_tokenizer.token_to_id(LLAMA_EOS) is None:
        raise ValueError(f"the language model's tokenizer has no {LLAMA_EOS}, so the token its answers end with must "
                         "come from the checkpoint: pass special_tokens=load_special_tokens(CHECKPOINT) "
                         "(models/loading.py) to collate_vqa and check_texts")
    return read_special_tokens(lm_tokenizer)


def decoder_only_tensors(lm_tokenizer, prompts: list[str], answers: list[str], items: list[dict],
                         max_prompt_tokens: int, max_answer_tokens: int,
                         special_tokens: SpecialTokens | None = None) -> dict:
    """One causal sequence per example, [BOS prompt answer eos], and its prompt alone for generation.

    The BOS (none for Qwen2 or SmolLM2) and eos are the special tokens' (`decoder_special_tokens`): the BOS is
    written here, not left to the tokenizer's post-processor, which may lack it where the model wants one;
    the eos is the model's own (`</s>`, `<|eot_id|>`, `<|im_end|>`, ...), so generation learns where to stop.
    input_ids/attention_mask (B, L), right-padded; labels (B, L): the answer and eos where they sit,
    -100 on the prompt (it is given, not predicted) and on padding; prompt_input_ids/attention_mask
    (B, Lp), left-padded, so generation continues every row right after its own last prompt token."""
    prompt_rows, answer_rows, pad_id = decoder_only_rows(lm_tokenizer, prompts, answers, items, max_prompt_tokens,
                                                         max_answer_tokens, special_tokens)
    input_ids, attention_mask = _pad([p + a for p, a in zip(prompt_rows, answer_rows)], pad_id)
    labels, _ = _pad([[-100] * len(p) + a for p, a in zip(prompt_rows, answer_rows)], -100)
    prompt_ids, prompt_mask = _pad(prompt_rows, pad_id, left=True)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "prompt_input_ids": prompt_ids, "prompt_attention_mask": prompt_mask}


def decoder_only_rows(lm_tokenizer, prompts: list[str], answers: list[str], items: list[dict], max_prompt_tokens: int,
                      max_answer_tokens: int, special_tokens: SpecialTokens | None = None
                      ) -> tuple[list[list[int]], list[list[int]], int]:
    """([BOS prompt] per example, [answer eos] per example, the pad id), each text checked against its budget."""
    special = decoder_special_tokens(lm_tokenizer, special_tokens)
    bos = [] if special.bos_id is None else [special.bos_id]
    prompt_rows = [bos + _real_ids(e) for e in lm_tokenizer.encode_batch(prompts, add_special_tokens=False)]
    answer_rows = [_real_ids(e) + [special.eos_id]
                   for e in lm_tokenizer.encode_batch(answers, add_special_tokens=False)]
    for item, prompt, answer in zip(items, prompt_rows, answer_rows):
        if len(prompt) > max_prompt_tokens:
            reason = _too_long("prompt in LLaMA tokens", len(prompt), "max_prompt_tokens", max_prompt_tokens)
            raise ValueError(f"{item['where']}: {reason}")
        if len(answer) > max_answer_tokens:
            reason = _too_long("answer in LLaMA tokens", len(answer), "max_answer_tokens", max_answer_tokens)
            raise ValueError(f"{item['where']}: {reason}")
    return prompt_rows, answer_rows, special.pad_id  # the pad is never read: masked, labels -100


def packed_decoder_only_tensors(prompt_rows: list[list[int]], answer_rows: list[list[int]], pad_id: int,
                                items: list[dict], pack: int, num_query_tokens: int) -> dict:
    """Examples end to end in rows of at most `pack` tokens of the language model's input (data/packing.py), each
    [Q query slots; BOS prompt answer eos]: the model writes the projected queries over the slots (which hold
    QUERY_SLOT), so the budget counts them. input_ids / attention_mask / labels / position_ids / segment_ids (R, W);
    prompt_input_ids / prompt_attention_mask (B, Lp) left-padded, in reading order ("order")."""
    Q = num_query_tokens
    packed = pack_examples([[QUERY_SLOT] * Q + p + a for p, a in zip(prompt_rows, answer_rows)],
                           [[-100] * (Q + len(p)) + a for p, a in zip(prompt_rows, answer_rows)], pack, pad_id,
                           names=[item["where"] for item in items])
    prompt_ids, prompt_mask = _pad([prompt_rows[i] for i in packed.order], pad_id, left=True)
    return packed.batch_fields() | {"prompt_input_ids": prompt_ids, "prompt_attention_mask": prompt_mask}


def collate_vqa(items: list, image_size: int, qformer_tokenizer, lm_tokenizer,
                max_prompt_tokens: int = MAX_PROMPT_TOKENS, max_answer_tokens: int = MAX_ANSWER_TOKENS, *,
                decoder_only: bool | None = None, special_tokens: SpecialTokens | None = None, pack: int | None = None,
                num_query_tokens: int = NUM_QUERY_TOKENS) -> dict:
    """Dataset items -> {"pixel_values": (B, 3, S, S) float32, "qformer_input_ids" / "qformer_attention_mask":
    (B, Lq) long, "input_ids" / "attention_mask" / "labels": (B, L) long (see below), "prompts", "answers",
    "paths": [B str], "lines": [B int], "index": (B,) long, "skipped": [Skipped, ...], "padding_tokens",
    "lm_tokens": int, "padding_share": float}. Token tensors are padded to the batch's longest text. If every
    item was skipped, the tensor entries are None (and "index" is empty). The padding share is padding / all
    positions of the language model's input, whose every row starts with `num_query_tokens` queries (the
    model's config.num_query_tokens; 32 in every released InstructBLIP).

    T5 (the tokenizer appends </s>): input_ids is the prompt, labels the answer + </s> (-100 on padding).
    LLaMA family: input_ids is [BOS prompt answer eos], labels the same positions with -100 on the prompt and
    padding, plus "prompt_input_ids" / "prompt_attention_mask" (B, Lp) padded on the left for generation
    (`decoder_only_tensors`). `decoder_only` (default: read from the tokenizer, `language_model_layout`) must
    match the tokenizer when given. `special_tokens` (models/loading.py `load_special_tokens`) give the BOS,
    eos and pad of any LLaMA-family checkpoint; without them, the tokenizer's BOS and </s> (Vicuna's).

    pack=N (LLaMA family only): padding-free rows of at most N tokens of the language model's input, queries
    included (`packed_decoder_only_tensors`): input_ids / attention_mask / labels and the added "position_ids" /
    "segment_ids" are (R, W), in the LM's own coordinates (models/instructblip.py `packed_forward`); the model
    takes all five with the image and Q-Former inputs. Everything per example (pixel_values, the Q-Former and
    prompt ids, prompts, answers, paths, lines, index) lists the examples in the order the rows hold them.

    The tokenizers are `tokenizers.Tokenizer`s with padding enabled (models/tokenizer.py). Use
    `functools.partial(collate_vqa, image_size=..., qformer_tokenizer=..., lm_tokenizer=...)` as a
    DataLoader's collate_fn: Tokenizer objects pickle, so workers get their own copies.
    """
    kept, skipped = split_skipped(items, "collate_vqa")
    layout = resolve_layout(lm_tokenizer, decoder_only, special_tokens)
    if pack is not None and layout != "decoder-only":
        raise ValueError("packing needs a decoder-only language model (Vicuna, LLaMA): flan-t5 reads the prompt with "
                         "its encoder and the answer with its decoder, so there is no one sequence to pack; "
                         "collate without pack")
    if not kept:
        packed_keys = {"position_ids": None, "segment_ids": None} if pack is not None else {}
        return {"pixel_values": None, "qformer_input_ids": None, "qformer_attention_mask": None,
                "input_ids": None, "attention_mask": None, "labels": None, **packed_keys, "prompts": [], "answers": [],
                "paths": [], "lines": [], "index": torch.zeros(0, dtype=torch.long), "skipped": skipped,
                "padding_tokens": 0, "lm_tokens": 0, "padding_share": 0.0}

    prompts, answers = [item["prompt"] for item in kept], [item["answer"] for item in kept]
    qformer_ids, qformer_mask = _tokenize_checked(qformer_tokenizer, prompts, kept, max_prompt_tokens,
                                                  "max_prompt_tokens", "prompt in Q-Former tokens")
    if layout == "encoder-decoder":
        text = _encoder_decoder_tensors(lm_tokenizer, prompts, answers, kept, max_prompt_tokens, max_answer_tokens)
    elif pack is None:
        text = decoder_only_tensors(lm_tokenizer, prompts, answers, kept, max_prompt_tokens, max_answer_tokens,
                                    special_tokens)
    else:
        rows = decoder_only_rows(lm_tokenizer, prompts, answers, kept, max_prompt_tokens, max_answer_tokens,
                                 special_tokens)
        text = packed_decoder_only_tensors(*rows, kept, pack, num_query_tokens)
        order = text["order"]  # every per-example field follows the examples' order in the rows
        kept, prompts, answers = [kept[i] for i in order], [prompts[i] for i in order], [answers[i] for i in order]
        qformer_ids, qformer_mask = qformer_ids[order], qformer_mask[order]
    if pack is None:
        text |= padding_counts(text["attention_mask"], real_prefix=num_query_tokens)

    return {
        "pixel_values": preprocess_images([item["image"] for item in kept], image_size),  # (B, 3, S, S)
        "qformer_input_ids": qformer_ids,
        "qformer_attention_mask": qformer_mask,
        **text,
        "prompts": prompts,
        "answers": answers,
        "paths": [item["path"] for item in kept],
        "lines": [item["line"] for item in kept],
        "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "skipped": skipped,
    }


def _encoder_decoder_tensors(t5_tokenizer, prompts, answers, items, max_prompt_tokens, max_answer_tokens) -> dict:
    """T5: input_ids/attention_mask (B, Lp) the prompt for the encoder, labels (B, La) the answer + </s>."""
    input_ids, attention_mask = _tokenize_checked(t5_tokenizer, prompts, items, max_prompt_tokens,
                                                  "max_prompt_tokens", "prompt in T5 tokens")
    answer_ids, answer_mask = _tokenize_checked(t5_tokenizer, answers, items, max_answer_tokens,
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
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
