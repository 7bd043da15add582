"""InstructBLIP with LoRA on the Q-Former (models/instructblip.py) on image-prompt-answer manifests: the
language model's (T5 or Vicuna) cross-entropy on the answer, evaluated by exact match of greedy answers.

    manifest (JSONL: image, prompt, answer) -> examples, images and token budgets checked before training
    VQADataset (data/instructblip.py): decode, RGB, resize, normalise
    collate_vqa: Q-Former ids of the prompt; the language model's prompt and answer ids, labels on the answer
"""

import functools
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from common.run_config import RunConfig
from data.instructblip import VQADataset, check_images, check_texts, collate_vqa
from data.manifest import BadLine
from engine.training import TrainingError
from evaluation.answers import AnswerBatches, answer_text
from models import load_instructblip, load_instructblip_tokenizers
from models.loading import load_special_tokens
from models.shard_loading import Quantize
from tasks.answer import PACKED_KEYS, AnswerTask
from tasks.inputs import read_data, refuse_unreadable


class InstructBlipTask(AnswerTask):
    """InstructBLIP with LoRA on the Q-Former on image-prompt-answer manifests."""

    name = "instructblip"
    default_targets = [r"qformer.*\.(query|key|value)"]
    input_flag = "--on-bad-image"
    input_key = "pixel_values"
    batch_keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask",
                  "labels")
    demo_defaults = dict(max_steps=1500, eval_every=300, save_every=750, warmup_steps=50, batch_size=16, lr=3e-3,
                         train_also=["language_projection"])
    max_new_tokens = 10

    @staticmethod
    def demo_sources(config: RunConfig, say=print) -> dict:
        from data.demo_models import ensure_demo_instructblip
        from data.demo_shapes import ensure_shapes_set

        cache = Path(config.data.cache_dir) / "demo"
        shapes = ensure_shapes_set(cache / "shapes")  # fixed data: not --seed
        say("offline demo: synthetic coloured shapes and a small RANDOM-INIT InstructBLIP "
            "(a pipeline check, not a pretrained model)")
        return dict(model=ensure_demo_instructblip(cache / "instructblip", shapes["texts"]),
                    train_data=shapes["train"], eval_data=config.sources.eval_data or shapes["eval"])

    @staticmethod
    def load_model(source: str, language_model_dtype: str, quantize: Quantize | None) -> nn.Module:
        return load_instructblip(source, language_model_dtype=language_model_dtype, quantize=quantize)

    @staticmethod
    def load_tokenizers(source: str):
        return load_instructblip_tokenizers(source)

    def __init__(self, config: RunConfig, say=print):
        src = config.sources
        if not all([src.model, src.train_data]):
            raise TrainingError("give --model and --train-data together, or neither for the offline demo")
        self.model = self.load_model(src.model, config.model.language_model_dtype, Quantize.of_run(config.model))
        decoder_only = self.model.config.decoder_only  # Vicuna (LLaMA) or flan-t5 behind the Q-Former
        if config.precision == "fp16" and not decoder_only:
            raise TrainingError("--precision fp16 is refused for instructblip with a T5 language model: "
                                "flan-t5 activations overflow fp16; use bf16 or fp32")
        self.tokenizers = self.load_tokenizers(src.model)
        # a decoder's bos/eos from its checkpoint's files (Vicuna's </s>, Llama 3's <|begin_of_text|>/<|eot_id|>, ...)
        special = load_special_tokens(src.model) if decoder_only else None

        def problems_of(examples):  # unreadable images, and prompts or answers over the token budgets
            # a text's problem is its line's, not its image's (other questions may ask about that image)
            return ([(e, f"{r}: {e.image}") for e, r in check_images(examples)]
                    + [(BadLine.of(e, r), r)
                       for e, r in check_texts(examples, *self.tokenizers, decoder_only=decoder_only,
                                               special_tokens=special)])

        examples, self.eval_examples = self.read_examples(problems_of, config, say)
        self.dataset = VQADataset(examples, on_bad_image=config.data.on_bad_input)
        self.image_size = self.model.config.vision.image_size
        pack = config.data.pack
        if pack is not None and not decoder_only:
            raise TrainingError("--pack puts examples end to end in a decoder-only language model's rows; this "
                                "InstructBLIP's language model is T5 (an encoder-decoder): leave --pack out")
        self.collate = functools.partial(collate_vqa, image_size=self.image_size,
                                         qformer_tokenizer=self.tokenizers[0], lm_tokenizer=self.tokenizers[1],
                                         decoder_only=decoder_only, special_tokens=special, pack=pack,
                                         num_query_tokens=self.model.config.num_query_tokens)
        if pack is not None:  # the packed rows' positions and example boundaries (data/packing.py)
            self.batch_keys = self.batch_keys + PACKED_KEYS

    def inputs(self, batch: dict, device: torch.device) -> dict:
        if batch["pixel_values"] is None:  # every image skipped: zero rows keep this rank in DDP's collectives
            empty = torch.zeros(0, 1, dtype=torch.long, device=device)
            return dict(pixel_values=torch.zeros(0, 3, self.image_size, self.image_size, device=device),
                        qformer_input_ids=empty, qformer_attention_mask=empty, input_ids=empty, attention_mask=empty,
                        labels=empty - 100)
        return {key: batch[key].to(device) for key in self.batch_keys}

    @staticmethod
    def read_eval_examples(config: RunConfig, data: str, audio_dir=None) -> list:
        examples = read_data(config, data, audio_dir).examples
        refuse_unreadable(check_images(examples), data, "image")
        return examples

    @classmethod
    def answer_batches(cls, model, tokenizers, examples, batch_size: int, workers: int, config: RunConfig,
                       feature_cache=None):
        """Both language models: the loss is over the answer tokens (+ eos) either way; T5 generates from the
        prompt (input_ids), a decoder-only LM from the left-padded prompt alone (prompt_input_ids, since its
        input_ids also hold the answer), and stops at any of its checkpoint's eos ids (the first of which the answers
        were trained to end with)."""
        qformer_tokenizer, lm_tokenizer = tokenizers
        decoder_only = model.config.decoder_only
        special = load_special_tokens(config.sources.model) if decoder_only else None
        loader = DataLoader(VQADataset(examples, on_bad_image="fail"), batch_size=batch_size, shuffle=False,
                            num_workers=workers,
                            collate_fn=functools.partial(collate_vqa, image_size=model.config.vision.image_size,
                                                         qformer_tokenizer=qformer_tokenizer, lm_tokenizer=lm_tokenizer,
                                                         decoder_only=decoder_only, special_tokens=special))
        stop = special.eos_ids if decoder_only else None  # T5: its config's eos
        eos = set(special.eos_ids if decoder_only else _as_tuple(model.language_model.config.eos_token_id))
        spec = AnswerBatches(condition=("pixel_values", "qformer_input_ids", "qformer_attention_mask"),
                             prompt=(("prompt_input_ids", "prompt_attention_mask") if decoder_only
                                     else ("input_ids", "attention_mask")),
                             stop=stop,
                             decode=functools.partial(answer_text, lm_tokenizer, stop=eos, skip_first=not decoder_only))
        return loader, spec

    @staticmethod
    def headline(metrics: dict) -> str:
        return f"exact match {metrics['exact_match']:.2f}%, answer loss {metrics['loss']:.4f}"

    @staticmethod
    def curves() -> tuple[str, str, dict]:
        return "exact match (%)", "answers on the eval set", {"exact match": lambda e: e["exact_match"]}


def _as_tuple(ids) -> tuple:
    return tuple(ids) if isinstance(ids, (tuple, list)) else (ids,)
