"""The tasks train.py trains: one small class each, so the loop in train.py is the same for all.

A task builds its model and data, and knows how to turn one optimizer step's micro-batches into
gradients (`forward_backward`), how to evaluate, and how to report:

    AudioTextTask    the dual encoder (models/audio_text.py); InfoNCE over the *global* batch:
                     embeddings gathered from every rank, GradCache across micro-batches
                     (models/contrastive.py); recall on the eval manifest (eval.py)
    InstructBlipTask InstructBLIP (models/instructblip.py); answer-token cross-entropy, each
                     micro-batch weighted by its share of the global batch's answer tokens;
                     exact match of greedy answers on the eval manifest (eval.py)
    AudioQATask      the whole Qwen2-Audio (models/qwen2_audio.py) tuned to answer questions about
                     clips; answer-token cross-entropy weighted as InstructBlipTask's; exact match
                     and word error rate of greedy answers (eval.py)

Each reaches the result a single process would get by taking the whole global batch at once
(tests/test_distributed.py), so a run is defined by its global batch, never by how it is split.
`forward_backward` returns the global batch's loss (detached, the same on every rank).
"""

import functools
import re
from pathlib import Path

import torch
from torch import nn

from data.audio_qa import AudioQADataset, check_audio, collate_audio_qa, read_audio_qa_manifest
from data.audio_qa import check_texts as check_audio_qa_texts
from data.audio_text import AudioTextDataset, Skipped, captions_flat, clip_durations, collate_audio_text, count_truncated_captions, precheck
from data.feature_cache import FeatureCache
from data.instructblip import VQADataset, check_images, check_texts, collate_vqa, read_vqa_manifest
from data.manifest import BadLine, load_manifest
from eval import evaluate, evaluate_audio_qa, evaluate_vqa, format_audio_qa, format_metrics, format_vqa
from lora.diagnose import ForwardStrategy
from lora.distributed import all_reduce_sum, device_rng_state, host_sum, set_device_rng_state, unwrap
from lora.training import StepEnv, TrainingError
from models import load_instructblip, load_instructblip_tokenizers, load_qwen2_audio, load_qwen2_audio_tokenizer, load_tokenizer
from models.audio_text import build_audio_text_model
from models.checkpoint import Checkpoint
from models.qwen2_audio import AUDIO, language_side_linear_paths
from models.contrastive import cached_loss_and_gradients, caption_keys, global_contrastive_loss, pad_columns
from models.shard_loading import Quantize
from models.text_cache import FrozenTextCache


def resolved(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def report_problems(problems, manifest: str, policy: str, role: str, what: str, flag: str, say) -> list[Skipped]:
    """(item, reason) problems found before training: an error naming them, or, when skipping,
    the Skipped entries to count and list in skipped.jsonl. An item with a file (a clip's audio,
    an example's image) is listed under that file, counted once however many lines name it; any
    other (a data.manifest.BadLine: a line that cannot be read, or a text over its budget) under
    its `manifest:line`."""
    problems = sorted(problems, key=lambda problem: problem[0].line)  # in file order: the first is the error's
    for item, reason in problems[:10]:
        say(f"  {item.where}: {reason}")
    if problems and (policy == "fail" or role == "eval"):
        (first, reason), more = problems[0], len(problems) - 1
        raise TrainingError(f"{first.where}: {reason}" + (f" (and {more} more {role} {what}(s), listed above)" if more else "")
                            + f"; fix {manifest}" + (f" or pass {flag} skip" if role == "train" else ""))
    if problems:
        say(f"skipping {len(problems)} unreadable train {what}(s) of {manifest}")
    return [Skipped(str(getattr(item, "audio", None) or getattr(item, "image", None) or item.where), item.line, reason)
            for item, reason in problems]


def quantization(args, heads: list[str]) -> Quantize | None:
    """--quantize nf4 (QLoRA): every Linear of the base held in NF4 as it loads, except the trained heads and
    --train-also modules (kept in their dtype: they train); the output head stays 16-bit (models/llama.py)."""
    return None if args.quantize == "none" else Quantize(keep=tuple(heads + list(args.train_also)))


class AudioTextTask:
    """Contrastive audio-text training (models/audio_text.py) on audio-caption manifests."""

    name = "audio-text"
    heads = ["audio_proj", "text_proj", "logit_scale"]  # trained from scratch beside LoRA
    default_targets = [r"audio_tower.*self_attn\.(q|k|v|out)_proj"]
    input_flag = "--on-bad-audio"
    input_key = "features"  # the batch tensor whose rows the non-finite guard checks
    min_examples = 2  # a global batch of one clip has no negative: its InfoNCE loss is 0, nothing to learn

    def __init__(self, args, demo: bool, say=print):
        self.quantize = quantization(args, self.heads)  # --quantize nf4: what the loaders hold in NF4 (None: nothing)
        if not demo and not all([args.audio_model, args.text_model, args.train_data]):
            raise TrainingError("give --audio-model, --text-model and --train-data together, or none of them for the offline demo")
        src = dict(audio_model=args.audio_model, text_model=args.text_model, train_data=resolved(args.train_data),
                   eval_data=resolved(args.eval_data))
        if demo:
            from data.demo_models import ensure_demo_models
            from data.demo_sounds import ensure_demo_set

            sounds = ensure_demo_set(Path(args.cache_dir) / "demo" / "sounds")  # fixed data: not --seed
            src.update(ensure_demo_models(Path(args.cache_dir) / "demo" / "towers", sounds["captions"]))
            src.update(train_data=sounds["train"], eval_data=src["eval_data"] or sounds["eval"])
            if args.encoding_strategy == "full_forward":  # the demo tower has no language model: the audio-qa demo's whole one
                from data.demo_audio_qa import ensure_demo_audio_qa

                src["audio_model"] = ensure_demo_audio_qa(Path(args.cache_dir) / "demo" / "audio-qa")["model"]
            say("offline demo: synthetic sound events and small RANDOM-INIT towers (a pipeline check, not a pretrained model)")
        self.encoding_strategy = args.encoding_strategy  # audio_tower: the tower alone; full_forward: the whole Qwen2-Audio
        try:
            self.model = build_audio_text_model(src["audio_model"], src["text_model"], args.embed_dim, seed=args.seed,
                                                encoding_strategy=self.encoding_strategy, language_model_dtype=args.language_model_dtype,
                                                quantize=self.quantize)
        except ValueError as error:  # e.g. full_forward on a checkpoint without the language model
            raise TrainingError(str(error)) from error
        self.audio_config = Checkpoint.open(src["audio_model"], weights=False).config  # names what the strategy leaves out
        self.tokenizer = load_tokenizer(src["text_model"])
        bad_lines = []  # lines that cannot be read: all reported below, an error under fail, skipped under skip
        clips, location = load_manifest(src["train_data"], args.train_audio_dir, flag="--train-audio-dir", bad_lines=bad_lines)
        if location.note:  # a Clotho or AudioCaps CSV whose audio sits in its split folder
            say(location.note)
        src["train_audio_dir"] = str(location.folder)
        clips, problems = precheck(clips)
        self.skipped_up_front = report_problems([(b, b.reason) for b in bad_lines] + [(c, f"{r}: {c.audio}") for c, r in problems],
                                                src["train_data"], args.on_bad_input, "train", "clip", self.input_flag, say)
        if not clips:
            raise TrainingError(f"no clip of {src['train_data']} is left to train on: every one was skipped (listed above)")
        self.eval_clips = None
        if src["eval_data"]:
            eval_clips, location = load_manifest(src["eval_data"], args.eval_audio_dir, flag="--eval-audio-dir")
            if location.note:
                say(location.note)
            src["eval_audio_dir"] = str(location.folder)
            self.eval_clips, problems = precheck(eval_clips)
            report_problems([(c, f"{r}: {c.audio}") for c, r in problems], src["eval_data"], "fail", "eval", "clip", self.input_flag, say)
        truncated = count_truncated_captions(self.tokenizer, clips)
        if truncated:
            say(f"note: {truncated} caption(s) of {src['train_data']} are longer than the text tower's "
                f"{self.tokenizer.truncation['max_length']} tokens and are cut there")
        self.pad_to_30s = args.pad_to_30s
        self.n_mels = self.model.audio_tower.config.num_mel_bins
        self.run = dict(task=self.name, demo=demo, **src, embed_dim=args.embed_dim, pad_to_30s=args.pad_to_30s,
                        encoding_strategy=self.encoding_strategy)
        if self.encoding_strategy == "full_forward":
            self.run["language_model_dtype"] = args.language_model_dtype
        # log-mel computed once per clip and front-end setting, shared by epochs, runs and ranks
        self.feature_cache = None if args.no_feature_cache else FeatureCache(Path(args.cache_dir) / "features")
        self.dataset = AudioTextDataset(clips, seed=args.seed, on_bad_audio=args.on_bad_input, n_mels=self.n_mels,
                                        feature_cache=self.feature_cache)
        # tokenized in the workers too: the main process only moves tensors and runs the model
        self.collate = functools.partial(collate_audio_text, n_mels=self.n_mels, pad_to_30s=args.pad_to_30s, tokenizer=self.tokenizer)
        self.text_cache, self.eval_text_cache = FrozenTextCache(), FrozenTextCache()

    def lengths(self) -> list[float]:
        """Each clip's duration, for --bucket-by-length."""
        return clip_durations(self.dataset.clips)

    def forward_strategy(self, targets: list[str]) -> ForwardStrategy:
        """What --encoding-strategy runs, for --diagnose check 7 and the check before training: under
        audio_tower, targets that select only the language side (projector, language model) are the
        seeds' failure, LoRA where the forward never runs; the language side is not even loaded."""
        if self.encoding_strategy == "full_forward":
            return ForwardStrategy("full_forward", "log-mel -> audio_tower -> multi_modal_projector -> language_model (after a "
                                   "fixed chat prompt) -> mean over the audio positions -> audio_proj")
        unloaded = language_side_linear_paths(self.audio_config)  # built on meta: a 7B layout costs nothing
        loaded = [path for path, _ in self.model.named_modules()]
        misplaced = {pattern: hits for pattern in targets
                     if (hits := [p for p in unloaded if re.fullmatch(pattern, p)]) and not any(re.fullmatch(pattern, p) for p in loaded)}
        fix = ("pass --encoding-strategy full_forward to run the clip through the whole Qwen2-Audio (audio_tower -> "
               "multi_modal_projector -> language_model), so LoRA on the language model trains (--audio-model must then be a "
               "whole Qwen2-Audio checkpoint); or keep audio_tower and target the tower: --targets "
               f"'{self.default_targets[0]}'")
        return ForwardStrategy("audio_tower", "log-mel -> audio_tower -> mean over the valid frames -> audio_proj "
                               "(the projector and the language model are never run, nor loaded)", misplaced, fix)

    def text_tower_frozen(self) -> bool:
        text_tower = self.model.text_tower
        return not text_tower.training and not any(p.requires_grad for p in text_tower.parameters())

    def prepare(self, env: StepEnv, say=print):
        """Before the first step, with the model on its device and in train mode: the frozen text
        tower's pooled features of every training caption, once, in a fixed order (models/text_cache.py)."""
        if self.text_tower_frozen():
            with torch.no_grad(), env.autocast():
                n = self.text_cache.fill(self.model.text_tower, captions_flat(self.dataset.clips)[0], self.tokenizer, env.device)
            say(f"text tower frozen: pooled features of {n} distinct captions computed once, reused by every step "
                "(and those of the eval captions by every evaluation)")

    def inputs(self, batch: dict, device: torch.device) -> dict:
        """A collated micro-batch -> the model's keyword arguments, on the device."""
        if batch["features"] is None:  # every clip skipped: zero rows keep this rank in DDP's collectives
            return dict(features=torch.zeros(0, self.n_mels, 4, device=device), frame_mask=torch.zeros(0, 4, dtype=torch.bool, device=device),
                        input_ids=torch.zeros(0, 1, dtype=torch.long, device=device), attention_mask=torch.zeros(0, 1, dtype=torch.long, device=device))
        x = {key: batch[key].to(device, non_blocking=True) for key in ("features", "frame_mask", "input_ids", "attention_mask")}
        if self.text_tower_frozen():  # each distinct caption's pooled features were computed once (prepare)
            x["text_pooled"] = self.text_cache.pooled(self.model.text_tower, batch["captions"], x["input_ids"], x["attention_mask"])
        return x

    def micro_batch_loss(self, model: nn.Module, batch: dict, env: StepEnv) -> torch.Tensor:
        """This micro-batch's own loss (for --diagnose and the non-finite guard's re-run)."""
        with env.autocast():
            return model(**self.inputs(batch, env.device)).loss

    def forward_backward(self, model: nn.Module, micro_batches: list[dict], env: StepEnv) -> torch.Tensor:
        """Gradients of the InfoNCE loss over the whole global batch; returns that loss."""
        inputs = [self.inputs(batch, env.device) for batch in micro_batches]
        if len(inputs) == 1:  # no accumulation: one forward with grad, embeddings gathered with gradients
            with env.autocast():
                out = model(**inputs[0])
            keys = caption_keys(inputs[0]["input_ids"], inputs[0]["attention_mask"])
            loss = global_contrastive_loss(out.audio_embeds, out.text_embeds, out.logit_scale, keys)
            env.backward(loss)  # no world-size factor: see models/contrastive.py
            return loss.detach()
        return self.grad_cache(model, inputs, env)

    def grad_cache(self, model: nn.Module, inputs: list[dict], env: StepEnv) -> torch.Tensor:
        """GradCache (models/contrastive.py): embeddings without grad, the global loss and its
        gradient once, then each micro-batch again with grad, its slice of that gradient pushed back."""
        states, audio, text, keys = [], [], [], []
        with torch.no_grad():  # pass 1: only the (B, E) embeddings survive each micro-batch
            for x in inputs:
                states.append(device_rng_state(env.device))  # replayed in pass 2: the same dropout masks
                with env.autocast():
                    out = model(**x)
                audio.append(out.audio_embeds.float())
                text.append(out.text_embeds.float())
                keys.append(caption_keys(x["input_ids"], x["attention_mask"]))
        after = device_rng_state(env.device)
        width = max(k.shape[1] for k in keys)
        cached = cached_loss_and_gradients(torch.cat(audio), torch.cat(text), unwrap(model).logit_scale,
                                           torch.cat([pad_columns(k, width) for k in keys]))
        start = 0
        for i, x in enumerate(inputs):  # pass 2
            set_device_rng_state(states[i], env.device)
            last = i == len(inputs) - 1
            with env.sync(model, last):
                with env.autocast():
                    out = model(**x)
                rows = slice(start, start + out.audio_embeds.shape[0])
                start = rows.stop
                # d(surrogate)/d(parameters) = d(loss)/d(embeddings) . d(embeddings)/d(parameters): the chain rule
                surrogate = (out.audio_embeds.float() * cached.audio_grad[rows]).sum() + (out.text_embeds.float() * cached.text_grad[rows]).sum()
                # DDP averages over ranks, but each rank's rows carry their own share of the gradient: undo the average
                surrogate = surrogate * env.world_size
                if last:  # logit_scale's gradient is the same on every rank, which the average keeps
                    surrogate = surrogate + cached.scale_grad * out.logit_scale
                env.backward(surrogate)
        set_device_rng_state(after, env.device)
        return cached.loss

    def evaluate(self, model: nn.Module, **kwargs) -> dict | None:
        if self.eval_clips is None:
            return None
        # its own text cache: eval.py computes the eval captions alone, in the same canonical chunks
        return evaluate(model, self.tokenizer, self.eval_clips, pad_to_30s=self.pad_to_30s, feature_cache=self.feature_cache,
                        text_cache=self.eval_text_cache if self.text_tower_frozen() else None, **kwargs)

    format = staticmethod(format_metrics)

    @staticmethod
    def headline(metrics: dict) -> str:
        return ", ".join(f"{d} R@1 {metrics[d]['R@1']:.2f} R@10 {metrics[d]['R@10']:.2f}" for d in ("text_to_audio", "audio_to_text"))

    @staticmethod
    def curves() -> tuple[str, str, dict]:
        """(y label, title, {label: metrics -> value}) for the evaluation plot."""
        values = {f"{d} {k}": (lambda e, d=d, k=k: e[d][k]) for d in ("text_to_audio", "audio_to_text") for k in ("R@1", "R@10")}
        return "recall (%)", "retrieval on the eval set", values


class AnswerTask:
    """What the two answer-generating tasks share (InstructBLIP, the whole Qwen2-Audio): a language
    model's cross-entropy on the answer tokens, accumulated token-weighted over the global batch."""

    heads: list[str] = []  # nothing trained from scratch: LoRA, and --train-also modules
    min_examples = 1

    def prepare(self, env: StepEnv, say=print):
        """Nothing to precompute before the first step."""

    def lengths(self) -> None:
        """No bucketing by length."""
        return None

    def forward_strategy(self, targets: list[str]) -> None:
        """One forward path: --diagnose check 7's own findings suffice."""
        return None

    def read_examples(self, read, problems_of, src: dict, policy: str, say):
        """Read the train and eval manifests with `read(path, role, bad_lines)`, check them with `problems_of`
        (before training, for every line), and keep what can be used: a train line that cannot be
        read or used is an error, or under `policy` skip a counted skip (self.skipped_up_front); any
        eval problem is an error. Returns (train examples, eval examples or None)."""
        bad_lines = []  # lines that cannot be read: all reported, an error under fail, skipped under skip
        examples = read(src["train_data"], "train", bad_lines)
        problems = [(line, line.reason) for line in bad_lines] + problems_of(examples)
        self.skipped_up_front = report_problems(problems, src["train_data"], policy, "train", "example", self.input_flag, say)
        bad = {item.line for item, _ in problems}  # one example a line
        examples = [e for e in examples if e.line not in bad]
        if not examples:
            raise TrainingError(f"no example of {src['train_data']} is left to train on: every one was skipped (listed above)")
        eval_examples = None
        if src["eval_data"]:
            eval_examples = read(src["eval_data"], "eval", None)
            report_problems(problems_of(eval_examples), src["eval_data"], "fail", "eval", "example", self.input_flag, say)
        return examples, eval_examples

    def micro_batch_loss(self, model: nn.Module, batch: dict, env: StepEnv) -> torch.Tensor:
        with env.autocast():
            return model(**self.inputs(batch, env.device)).loss

    def forward_backward(self, model: nn.Module, micro_batches: list[dict], env: StepEnv) -> torch.Tensor:
        """Gradients of the mean answer-token loss over the whole global batch; returns that loss.

        Each micro-batch's mean loss is weighted by its answer tokens over the global batch's, so the
        sum is the mean over every answer token of the global batch, as one big batch would give."""
        # counted on the host copies: no wait for the device; the sum over ranks through host_sum
        tokens = [0 if b["labels"] is None else int((b["labels"] != -100).sum()) for b in micro_batches]
        total = host_sum(sum(tokens))
        inputs = [self.inputs(batch, env.device) for batch in micro_batches]
        loss = torch.zeros((), device=env.device)
        for i, (x, n) in enumerate(zip(inputs, tokens)):
            with env.sync(model, last=i == len(inputs) - 1):
                with env.autocast():
                    out = model(**x)
                # a micro-batch without answer tokens still runs backward (with a zero loss) for DDP
                share = out.loss * (n / total) if n else out.logits.sum() * 0.0
                env.backward(share * env.world_size)  # DDP averages over ranks; the shares already sum to the mean
            loss += share.detach().float()
        return all_reduce_sum(loss)


class InstructBlipTask(AnswerTask):
    """InstructBLIP with LoRA on the Q-Former (models/instructblip.py) on image-prompt-answer manifests."""

    name = "instructblip"
    default_targets = [r"qformer.*\.(query|key|value)"]
    input_flag = "--on-bad-image"
    input_key = "pixel_values"
    batch_keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask", "labels")

    def __init__(self, args, demo: bool, say=print):
        self.quantize = quantization(args, self.heads)  # --quantize nf4: what the loaders hold in NF4 (None: nothing)
        if not demo and not all([args.model, args.train_data]):
            raise TrainingError("give --model and --train-data together, or neither for the offline demo")
        src = dict(model=args.model, train_data=resolved(args.train_data), eval_data=resolved(args.eval_data))
        if demo:
            from data.demo_models import ensure_demo_instructblip
            from data.demo_shapes import ensure_shapes_set

            shapes = ensure_shapes_set(Path(args.cache_dir) / "demo" / "shapes")  # fixed data: not --seed
            src.update(model=ensure_demo_instructblip(Path(args.cache_dir) / "demo" / "instructblip", shapes["texts"]),
                       train_data=shapes["train"], eval_data=src["eval_data"] or shapes["eval"])
            say("offline demo: synthetic coloured shapes and a small RANDOM-INIT InstructBLIP (a pipeline check, not a pretrained model)")
        self.model = load_instructblip(src["model"], language_model_dtype=args.language_model_dtype,
                                       quantize=self.quantize)
        decoder_only = self.model.config.decoder_only  # Vicuna (LLaMA) or flan-t5 behind the Q-Former
        if args.precision == "fp16" and not decoder_only:
            raise TrainingError("--precision fp16 is refused for instructblip with a T5 language model: flan-t5 activations "
                                "overflow fp16; use bf16 or fp32")
        self.tokenizers = load_instructblip_tokenizers(src["model"])

        def problems_of(examples):  # unreadable images, and prompts or answers over the token budgets
            # a text's problem is its line's, not its image's (other questions may ask about that image)
            return ([(e, f"{r}: {e.image}") for e, r in check_images(examples)]
                    + [(BadLine(e.source, e.line, r), r) for e, r in check_texts(examples, *self.tokenizers, decoder_only=decoder_only)])

        examples, self.eval_examples = self.read_examples(lambda path, role, bad_lines: read_vqa_manifest(path, bad_lines=bad_lines),
                                                          problems_of, src, args.on_bad_input, say)
        self.run = dict(task=self.name, demo=demo, **src, language_model_dtype=args.language_model_dtype)
        self.dataset = VQADataset(examples, on_bad_image=args.on_bad_input)
        self.image_size = self.model.config.vision.image_size
        self.collate = functools.partial(collate_vqa, image_size=self.image_size, qformer_tokenizer=self.tokenizers[0],
                                         lm_tokenizer=self.tokenizers[1], decoder_only=decoder_only)

    def inputs(self, batch: dict, device: torch.device) -> dict:
        if batch["pixel_values"] is None:  # every image skipped: zero rows keep this rank in DDP's collectives
            empty = torch.zeros(0, 1, dtype=torch.long, device=device)
            return dict(pixel_values=torch.zeros(0, 3, self.image_size, self.image_size, device=device), qformer_input_ids=empty,
                        qformer_attention_mask=empty, input_ids=empty, attention_mask=empty, labels=empty - 100)
        return {key: batch[key].to(device) for key in self.batch_keys}

    def evaluate(self, model: nn.Module, **kwargs) -> dict | None:
        if self.eval_examples is None:
            return None
        return evaluate_vqa(model, self.tokenizers, self.eval_examples, **kwargs)

    format = staticmethod(format_vqa)

    @staticmethod
    def headline(metrics: dict) -> str:
        return f"exact match {metrics['exact_match']:.2f}%, answer loss {metrics['loss']:.4f}"

    @staticmethod
    def curves() -> tuple[str, str, dict]:
        return "exact match (%)", "answers on the eval set", {"exact match": lambda e: e["exact_match"]}


class AudioQATask(AnswerTask):
    """The whole Qwen2-Audio (models/qwen2_audio.py) tuned to answer questions about clips: audio-prompt-answer
    manifests (data/audio_qa.py), LoRA on the language model and/or the audio tower, loss on the answer tokens."""

    name = "audio-qa"
    default_targets = [r"language_model.*self_attn\.(q|k|v|o)_proj"]
    input_flag = "--on-bad-audio"
    input_key = "input_features"
    batch_keys = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "labels")

    def __init__(self, args, demo: bool, say=print):
        self.quantize = quantization(args, self.heads)  # --quantize nf4: what the loaders hold in NF4 (None: nothing)
        if not demo and not all([args.model, args.train_data]):
            raise TrainingError("give --model (a whole Qwen2-Audio) and --train-data together, or neither for the offline demo")
        src = dict(model=args.model, train_data=resolved(args.train_data), eval_data=resolved(args.eval_data))
        if demo:
            from data.demo_audio_qa import ensure_demo_audio_qa

            made = ensure_demo_audio_qa(Path(args.cache_dir) / "demo" / "audio-qa")  # fixed data: not --seed
            src.update(model=made["model"], train_data=made["train_data"], eval_data=src["eval_data"] or made["eval_data"])
            say("offline demo: questions about synthetic sounds and a tiny RANDOM-INIT Qwen2-Audio (a pipeline check, not a pretrained model)")
        try:
            self.model = load_qwen2_audio(src["model"], language_model_dtype=args.language_model_dtype,
                                          quantize=self.quantize)
        except ValueError as error:
            raise TrainingError(f"--model: {error}") from error
        self.tokenizer = load_qwen2_audio_tokenizer(src["model"])
        if self.tokenizer.token_to_id(AUDIO) != self.model.config.audio_token_id:
            raise TrainingError(f"{src['model']}: the tokenizer's {AUDIO} is id {self.tokenizer.token_to_id(AUDIO)} but config.json's "
                                f"audio_token_index is {self.model.config.audio_token_id}: tokenizer and model disagree")

        def problems_of(examples):  # missing audio, and prompts or answers over the token budgets (listed by their line)
            return ([(e, f"{r}: {e.audio}") for e, r in check_audio(examples)]
                    + [(BadLine(e.source, e.line, r), r) for e, r in check_audio_qa_texts(examples, self.tokenizer)])

        audio_dirs = dict(train=args.train_audio_dir, eval=args.eval_audio_dir)
        examples, self.eval_examples = self.read_examples(lambda path, role, bad_lines: read_audio_qa_manifest(path, audio_dirs[role], bad_lines),
                                                          problems_of, src, args.on_bad_input, say)
        self.pad_to_30s = args.pad_to_30s
        self.n_mels = self.model.audio_tower.config.num_mel_bins
        self.run = dict(task=self.name, demo=demo, **src, language_model_dtype=args.language_model_dtype, pad_to_30s=args.pad_to_30s)
        self.feature_cache = None if args.no_feature_cache else FeatureCache(Path(args.cache_dir) / "features")
        self.dataset = AudioQADataset(examples, on_bad_audio=args.on_bad_input, n_mels=self.n_mels, feature_cache=self.feature_cache)
        self.collate = functools.partial(collate_audio_qa, tokenizer=self.tokenizer, pad_to_30s=args.pad_to_30s)

    def inputs(self, batch: dict, device: torch.device) -> dict:
        if batch["input_ids"] is None:  # every clip skipped: zero rows keep this rank in DDP's collectives
            empty = torch.zeros(0, 1, dtype=torch.long, device=device)
            return dict(input_ids=empty, attention_mask=empty, input_features=torch.zeros(0, self.n_mels, 4, device=device),
                        feature_attention_mask=torch.zeros(0, 4, dtype=torch.long, device=device), labels=empty - 100)
        return {key: batch[key].to(device) for key in self.batch_keys}

    # the same token-weighted accumulation over the global batch as InstructBLIP's: these functions read only
    # self.inputs and the micro-batches' labels

    def evaluate(self, model: nn.Module, **kwargs) -> dict | None:
        if self.eval_examples is None:
            return None
        return evaluate_audio_qa(model, self.tokenizer, self.eval_examples, pad_to_30s=self.pad_to_30s,
                                 feature_cache=self.feature_cache, **kwargs)

    format = staticmethod(format_audio_qa)

    @staticmethod
    def headline(metrics: dict) -> str:
        return f"exact match {metrics['exact_match']:.2f}%, WER {metrics['wer']:.2f}%, answer loss {metrics['loss']:.4f}"

    @staticmethod
    def curves() -> tuple[str, str, dict]:
        return "percent", "answers on the eval set", {"exact match": lambda e: e["exact_match"], "word error rate": lambda e: e["wer"]}


TASKS = {task.name: task for task in (AudioTextTask, InstructBlipTask, AudioQATask)}
