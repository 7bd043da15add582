"""Audio-text contrastive retrieval: the dual encoder of models/audio_text.py trained with InfoNCE over the
global batch (tasks/contrastive.py), evaluated by retrieval recall (evaluation/retrieval.py).

    manifest (JSONL, Clotho or AudioCaps CSV) -> clips with captions, checked before training
    AudioTextDataset (data/audio_text.py): decode, resample, log-mel (cached per clip), one caption an epoch
    collate_audio_text: pad to the batch's longest clip, tokenize the captions
    forward_backward: one forward with the embeddings gathered over ranks, or GradCache over micro-batches
"""

import functools
import re
from pathlib import Path

import torch
from torch import nn

from common.atomic import atomic_write
from common.run_config import RunConfig
from data.audio_text import (AudioTextDataset, captions_flat, clip_durations, collate_audio_text,
                             count_truncated_captions, precheck)
from data.feature_cache import FeatureCache
from data.search_index import save_npz
from engine.training import StepEnv, TrainingError
from evaluation.retrieval import encode_clips, evaluate_retrieval, format_metrics, retrieval_metrics
from lora.diagnose import ForwardStrategy
from models import load_tokenizer
from models.audio_text import build_audio_text_model, load_run
from models.checkpoint import Checkpoint
from models.contrastive import caption_keys
from models.qwen2_audio import language_side_linear_paths
from models.shard_loading import Quantize
from models.text_cache import FrozenTextCache
from tasks.inputs import data_fingerprint, read_data, refuse_unreadable, report_problems
from tasks.contrastive import global_contrastive_loss, grad_cache


def feature_cache_of(config: RunConfig) -> FeatureCache | None:
    """The log-mel cache under the run's cache folder (data/feature_cache.py), unless it is switched off."""
    return FeatureCache(Path(config.data.cache_dir) / "features") if config.data.feature_cache else None


class AudioTextTask:
    """Contrastive audio-text training (models/audio_text.py) on audio-caption manifests."""

    name = "audio-text"
    heads = ["audio_proj", "text_proj", "logit_scale"]  # trained from scratch beside LoRA
    default_targets = [r"audio_tower.*self_attn\.(q|k|v|out)_proj"]
    input_flag = "--on-bad-audio"
    input_key = "features"  # the batch tensor whose rows the non-finite guard checks
    min_examples = 2  # a global batch of one clip has no negative: its InfoNCE loss is 0, nothing to learn
    demo_defaults = dict(max_steps=600, eval_every=150, save_every=300, warmup_steps=50)  # a few CPU minutes
    given_sources = ("audio_model", "text_model")  # with --train-data: what makes a run not the demo

    @staticmethod
    def demo_sources(config: RunConfig, say=print) -> dict:
        """The offline demo's data and models, built once in the cache (fixed: never --seed): Sources fields."""
        from data.demo_models import ensure_demo_models
        from data.demo_sounds import ensure_demo_set

        cache = Path(config.data.cache_dir) / "demo"
        sounds = ensure_demo_set(cache / "sounds")
        sources = dict(ensure_demo_models(cache / "towers", sounds["captions"]), train_data=sounds["train"],
                       eval_data=config.sources.eval_data or sounds["eval"])
        # the demo tower has no language model: the audio-qa demo's
        if config.model.encoding_strategy == "full_forward":
            from data.demo_audio_qa import ensure_demo_audio_qa

            sources["audio_model"] = ensure_demo_audio_qa(cache / "audio-qa")["model"]
        say("offline demo: synthetic sound events and small RANDOM-INIT towers "
            "(a pipeline check, not a pretrained model)")
        return sources

    def __init__(self, config: RunConfig, say=print):
        """The model (no LoRA yet) and the data of a run; `self.config` is `config` with the audio folders found
        and the training data's fingerprint."""
        src, model_settings = config.sources, config.model
        if config.data.pack is not None:
            raise TrainingError("--pack puts answer examples end to end in a language model's rows (--task audio-qa, "
                                "instructblip with Vicuna); audio-text batches have no answer tokens: leave it out")
        if not all([src.audio_model, src.text_model, src.train_data]):
            raise TrainingError("give --audio-model, --text-model and --train-data together, "
                                "or none of them for the offline demo")
        # audio_tower: the tower alone; full_forward: the whole Qwen2-Audio
        self.encoding_strategy = model_settings.encoding_strategy
        self.quantize = Quantize.of_run(model_settings)  # --quantize nf4: what the loaders hold in NF4 (None: nothing)
        try:
            self.model = build_audio_text_model(src.audio_model, src.text_model, model_settings.embed_dim,
                                                seed=config.optim.seed, encoding_strategy=self.encoding_strategy,
                                                language_model_dtype=model_settings.language_model_dtype,
                                                quantize=self.quantize)
        except ValueError as error:  # e.g. full_forward on a checkpoint without the language model
            raise TrainingError(str(error)) from error
        self.audio_config = Checkpoint.open(src.audio_model, weights=False).config  # names what the strategy leaves out
        self.tokenizer = load_tokenizer(src.text_model)
        bad_lines = []  # lines that cannot be read: all reported below, an error under fail, skipped under skip
        source = read_data(config, src.train_data, src.train_audio_dir, bad_lines, flag="--train-audio-dir")
        if source.note:  # a Clotho or AudioCaps CSV whose audio sits in its split folder
            say(source.note)
        found = dict(train_audio_dir=str(source.media_dir) if source.media_dir else None,
                     train_data_sha256=data_fingerprint(source))
        clips, problems = precheck(source.examples)
        self.skipped_up_front = report_problems([(b, b.reason) for b in bad_lines]
                                                + [(c, f"{r}: {c.audio}") for c, r in problems],
                                                src.train_data, config.data.on_bad_input, "train", "clip",
                                                self.input_flag, say)
        if not clips:
            raise TrainingError(f"no clip of {src.train_data} is left to train on: every one was skipped "
                                "(listed above)")
        self.eval_clips = None
        if src.eval_data:
            eval_source = read_data(config, src.eval_data, src.eval_audio_dir, flag="--eval-audio-dir")
            if eval_source.note:
                say(eval_source.note)
            found["eval_audio_dir"] = str(eval_source.media_dir) if eval_source.media_dir else None
            self.eval_clips, problems = precheck(eval_source.examples)
            report_problems([(c, f"{r}: {c.audio}") for c, r in problems], src.eval_data, "fail", "eval", "clip",
                            self.input_flag, say)
        truncated = count_truncated_captions(self.tokenizer, clips)
        if truncated:
            say(f"note: {truncated} caption(s) of {src.train_data} are longer than the text tower's "
                f"{self.tokenizer.truncation['max_length']} tokens and are cut there")
        self.config = config.replace(**found)
        self.pad_to_30s = model_settings.pad_to_30s
        self.n_mels = self.model.audio_tower.config.num_mel_bins
        # log-mel computed once per clip and front-end setting, shared by epochs, runs and ranks
        self.feature_cache = feature_cache_of(config)
        self.order = source.order_for(clips)  # WebDataset shards: shard-aware shuffling (data/shards.py); else None
        self.dataset = AudioTextDataset(clips, seed=config.optim.seed, on_bad_audio=config.data.on_bad_input,
                                        n_mels=self.n_mels, feature_cache=self.feature_cache)
        # tokenized in the workers too: the main process only moves tensors and runs the model
        self.collate = functools.partial(collate_audio_text, n_mels=self.n_mels, pad_to_30s=self.pad_to_30s,
                                         tokenizer=self.tokenizer)
        self.text_cache, self.eval_text_cache = FrozenTextCache(), FrozenTextCache()

    def lengths(self) -> list[float]:
        """Each clip's duration, for --bucket-by-length."""
        return clip_durations(self.dataset.clips)

    def forward_strategy(self, targets: list[str]) -> ForwardStrategy:
        """What --encoding-strategy runs, for --diagnose check 7 and the check before training: under
        audio_tower, targets that select only the language side (projector, language model) are LoRA where
        the forward never runs (the projector and language model are not even loaded)."""
        if self.encoding_strategy == "full_forward":
            return ForwardStrategy("full_forward", "log-mel -> audio_tower -> multi_modal_projector -> language_model "
                                   "(after a fixed chat prompt) -> mean over the audio positions -> audio_proj")
        unloaded = language_side_linear_paths(self.audio_config)  # built on meta: a 7B layout costs nothing
        loaded = [path for path, _ in self.model.named_modules()]
        misplaced = {pattern: hits for pattern in targets
                     if (hits := [p for p in unloaded if re.fullmatch(pattern, p)])
                     and not any(re.fullmatch(pattern, p) for p in loaded)}
        fix = ("pass --encoding-strategy full_forward to run the clip through the whole Qwen2-Audio "
               "(audio_tower -> multi_modal_projector -> language_model), so LoRA on the language model trains "
               "(--audio-model must then be a whole Qwen2-Audio checkpoint); or keep audio_tower and target the "
               f"tower: --targets '{self.default_targets[0]}'")
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
                n = self.text_cache.fill(self.model.text_tower, captions_flat(self.dataset.clips)[0], self.tokenizer,
                                         env.device)
            say(f"text tower frozen: pooled features of {n} distinct captions computed once, reused by every step "
                "(and those of the eval captions by every evaluation)")

    def inputs(self, batch: dict, device: torch.device) -> dict:
        """A collated micro-batch -> the model's keyword arguments, on the device."""
        if batch["features"] is None:  # every clip skipped: zero rows keep this rank in DDP's collectives
            empty = dict(dtype=torch.long, device=device)
            return dict(features=torch.zeros(0, self.n_mels, 4, device=device),
                        frame_mask=torch.zeros(0, 4, dtype=torch.bool, device=device),
                        input_ids=torch.zeros(0, 1, **empty), attention_mask=torch.zeros(0, 1, **empty))
        x = {key: batch[key].to(device, non_blocking=True)
             for key in ("features", "frame_mask", "input_ids", "attention_mask")}
        if self.text_tower_frozen():  # each distinct caption's pooled features were computed once (prepare)
            x["text_pooled"] = self.text_cache.pooled(self.model.text_tower, batch["captions"], x["input_ids"],
                                                      x["attention_mask"])
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
            env.backward(loss)  # no world-size factor: see tasks/contrastive.py
            return loss.detach()
        return grad_cache(model, inputs, env)

    def evaluate(self, model: nn.Module, batch_size: int, workers: int, precision: str,
                 progress: bool = False) -> dict | None:
        """Recall on the eval manifest, during training (None without one)."""
        if self.eval_clips is None:
            return None
        # its own text cache: eval.py computes the eval captions alone, in the same canonical chunks
        return evaluate_retrieval(model, self.tokenizer, self.eval_clips, pad_to_30s=self.pad_to_30s,
                                  feature_cache=self.feature_cache, batch_size=batch_size, workers=workers,
                                  precision=precision, progress=progress,
                                  text_cache=self.eval_text_cache if self.text_tower_frozen() else None)

    # ---- a trained run, for eval.py ------------------------------------------------------------

    @staticmethod
    def load_trained(run_dir, config: RunConfig, device, with_adapter: bool = True):
        """(model, tokenizers) of a finished run: load_run (models/audio_text.py) in config.precision, the text
        tower's tokenizer."""
        model = load_run(run_dir, device=device, precision=config.precision, with_adapter=with_adapter)
        return model, model.tokenizer

    @staticmethod
    def evaluate_file(model, tokenizers, config: RunConfig, data: str, audio_dir=None, *, batch_size: int,
                      workers: int, feature_cache=None, save_embeddings=None, **_) -> dict:
        """Recall on a manifest given to eval.py, in the model's own precision and front end (load_run's); every
        clip must be readable. `save_embeddings`: an .npz path for the embeddings and the caption-to-clip index."""
        clips, problems = precheck(read_data(config, data, audio_dir).examples)
        refuse_unreadable(problems, data, "audio")
        audio, text, text_audio_index = encode_clips(model, tokenizers, clips, batch_size=batch_size, workers=workers,
                                                     feature_cache=feature_cache)
        if save_embeddings:
            atomic_write(save_embeddings, functools.partial(save_npz, audio=audio, text=text,
                                                            text_audio_index=text_audio_index))
        return retrieval_metrics(text @ audio.T, text_audio_index)

    format = staticmethod(format_metrics)

    @staticmethod
    def headline(metrics: dict) -> str:
        return ", ".join(f"{d} R@1 {metrics[d]['R@1']:.2f} R@10 {metrics[d]['R@10']:.2f}"
                         for d in ("text_to_audio", "audio_to_text"))

    @staticmethod
    def curves() -> tuple[str, str, dict]:
        """(y label, title, {label: metrics -> value}) for the evaluation plot."""
        values = {f"{d} {k}": (lambda e, d=d, k=k: e[d][k])
                  for d in ("text_to_audio", "audio_to_text") for k in ("R@1", "R@10")}
        return "recall (%)", "retrieval on the eval set", values
