"""Audio question answering: the whole Qwen2-Audio (models/qwen2_audio.py) tuned to answer questions about
clips, LoRA on the language model and/or the audio tower, the loss on the answer tokens; evaluated by exact
match and word error rate of greedy answers.

    manifest (JSONL: audio, prompt, answer) -> examples, audio and token budgets checked before training
    AudioQADataset (data/audio_qa.py): decode, resample, log-mel (cached per clip)
    collate_audio_qa: the chat template with one <|AUDIO|> per tower output, labels on the answer + <|im_end|>
"""

import functools
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from common.run_config import RunConfig
from data.audio_qa import AudioQADataset, check_audio, collate_audio_qa
from data.audio_qa import check_texts as check_audio_qa_texts
from data.manifest import BadLine
from engine.training import TrainingError
from evaluation.answers import AnswerBatches, answer_text
from models import load_qwen2_audio, load_qwen2_audio_tokenizer
from models.loading import load_special_tokens
from models.qwen2_audio import AUDIO, IM_END
from models.shard_loading import Quantize
from tasks.answer import PACKED_KEYS, AnswerTask
from tasks.audio_text import feature_cache_of
from tasks.inputs import read_data, refuse_unreadable


class AudioQATask(AnswerTask):
    """The whole Qwen2-Audio tuned to answer questions about clips, on audio-prompt-answer manifests."""

    name = "audio-qa"
    default_targets = [r"language_model.*self_attn\.(q|k|v|o)_proj"]
    input_flag = "--on-bad-audio"
    input_key = "input_features"
    batch_keys = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "labels")
    demo_defaults = dict(max_steps=1500, eval_every=500, save_every=750, warmup_steps=50, batch_size=16, lr=3e-3,
                         train_also=["multi_modal_projector"])
    report_wer = True

    @staticmethod
    def demo_sources(config: RunConfig, say=print) -> dict:
        from data.demo_audio_qa import ensure_demo_audio_qa

        made = ensure_demo_audio_qa(Path(config.data.cache_dir) / "demo" / "audio-qa")  # fixed data: not --seed
        say("offline demo: questions about synthetic sounds and a tiny RANDOM-INIT Qwen2-Audio "
            "(a pipeline check, not a pretrained model)")
        return dict(model=made["model"], train_data=made["train_data"],
                    eval_data=config.sources.eval_data or made["eval_data"])

    @staticmethod
    def load_model(source: str, language_model_dtype: str, quantize: Quantize | None) -> nn.Module:
        try:
            return load_qwen2_audio(source, language_model_dtype=language_model_dtype, quantize=quantize)
        except ValueError as error:
            raise TrainingError(f"--model: {error}") from error

    @staticmethod
    def load_tokenizers(source: str):
        return load_qwen2_audio_tokenizer(source)

    def __init__(self, config: RunConfig, say=print):
        src = config.sources
        if not all([src.model, src.train_data]):
            raise TrainingError("give --model (a whole Qwen2-Audio) and --train-data together, "
                                "or neither for the offline demo")
        self.model = self.load_model(src.model, config.model.language_model_dtype, Quantize.of_run(config.model))
        self.tokenizers = tokenizer = self.load_tokenizers(src.model)
        if tokenizer.token_to_id(AUDIO) != self.model.config.audio_token_id:
            raise TrainingError(f"{src.model}: the tokenizer's {AUDIO} is id {tokenizer.token_to_id(AUDIO)} "
                                f"but config.json's audio_token_index is {self.model.config.audio_token_id}: "
                                "tokenizer and model disagree")

        # missing audio, and prompts or answers over the token budgets (listed by their line)
        def problems_of(examples):
            return ([(e, f"{r}: {e.audio}") for e, r in check_audio(examples)]
                    + [(BadLine.of(e, r), r) for e, r in check_audio_qa_texts(examples, tokenizer)])

        examples, self.eval_examples = self.read_examples(problems_of, config, say)
        self.n_mels = self.model.audio_tower.config.num_mel_bins
        self.feature_cache = feature_cache_of(config)
        self.dataset = AudioQADataset(examples, on_bad_audio=config.data.on_bad_input, n_mels=self.n_mels,
                                      feature_cache=self.feature_cache)
        self.collate = functools.partial(collate_audio_qa, tokenizer=tokenizer, pad_to_30s=config.model.pad_to_30s,
                                         pack=config.data.pack)
        if config.data.pack is not None:  # the packed rows' positions and example boundaries (data/packing.py)
            self.batch_keys = self.batch_keys + PACKED_KEYS

    def inputs(self, batch: dict, device: torch.device) -> dict:
        if batch["input_ids"] is None:  # every clip skipped: zero rows keep this rank in DDP's collectives
            empty = torch.zeros(0, 1, dtype=torch.long, device=device)
            return dict(input_ids=empty, attention_mask=empty,
                        input_features=torch.zeros(0, self.n_mels, 4, device=device),
                        feature_attention_mask=torch.zeros(0, 4, dtype=torch.long, device=device), labels=empty - 100)
        return {key: batch[key].to(device) for key in self.batch_keys}

    @staticmethod
    def read_eval_examples(config: RunConfig, data: str, audio_dir=None) -> list:
        examples = read_data(config, data, audio_dir).examples
        refuse_unreadable(check_audio(examples), data, "audio")
        return examples

    @classmethod
    def answer_batches(cls, model, tokenizers, examples, batch_size: int, workers: int, config: RunConfig,
                       feature_cache=None):
        """Greedy answers from the left-padded prompts, stopping at <|im_end|> or an eos (data/audio_qa.py)."""
        tokenizer = tokenizers
        dataset = AudioQADataset(examples, on_bad_audio="fail", n_mels=model.audio_tower.config.num_mel_bins,
                                 feature_cache=feature_cache)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                            collate_fn=functools.partial(collate_audio_qa, tokenizer=tokenizer,
                                                         pad_to_30s=config.model.pad_to_30s))
        # <|im_end|>, which the answers were trained to end with, and every eos the checkpoint lists
        stop = tuple(dict.fromkeys((tokenizer.token_to_id(IM_END),)
                                   + load_special_tokens(config.sources.model).eos_ids))
        spec = AnswerBatches(condition=("input_features", "feature_attention_mask"),
                             prompt=("prompt_input_ids", "prompt_attention_mask"), stop=stop,
                             decode=functools.partial(answer_text, tokenizer, stop=set(stop)))
        return loader, spec

    @staticmethod
    def headline(metrics: dict) -> str:
        return (f"exact match {metrics['exact_match']:.2f}%, WER {metrics['wer']:.2f}%, "
                f"answer loss {metrics['loss']:.4f}")

    @staticmethod
    def curves() -> tuple[str, str, dict]:
        return ("percent", "answers on the eval set",
                {"exact match": lambda e: e["exact_match"], "word error rate": lambda e: e["wer"]})
