"""What the tasks whose model answers in words share (InstructBLIP, the whole Qwen2-Audio): a language model's
cross-entropy on the answer tokens, accumulated token-weighted over the global batch, and evaluation by the
greedy-answer loop of evaluation/answers.py.

A subclass names its model loader, reads and checks its manifests, builds its dataset and collate, and says
how its batches feed the answer loop (`answer_batches`).
"""

import torch
from torch import nn
from torch.utils.data import DataLoader

from common.distributed import all_reduce_sum, host_sum
from common.precision import Precision
from common.run_config import RunConfig
from common.run_files import RunDirectory
from engine.training import StepEnv, TrainingError
from evaluation.answers import AnswerBatches, evaluate_answers, format_answers
from lora import load_adapter
from lora.inject import freeze_as_trained
from models.shard_loading import Quantize
from tasks.inputs import data_fingerprint, read_data, report_problems


PACKED_KEYS = ("position_ids", "segment_ids")  # what a packed batch adds for the model (data/packing.py)


class AnswerTask:
    heads: list[str] = []  # nothing trained from scratch: LoRA, and --train-also modules
    min_examples = 1
    given_sources = ("model",)
    max_new_tokens = 16  # the longest generated answer of an evaluation
    report_wer = False  # add the word error rate to the evaluation

    # ---- what a subclass provides -------------------------------------------------------------

    @staticmethod
    def load_model(source: str, language_model_dtype: str, quantize: Quantize | None) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def load_tokenizers(source: str):
        raise NotImplementedError

    @staticmethod
    def read_eval_examples(config: RunConfig, data: str, audio_dir=None) -> list:
        """The examples of an evaluation manifest, every file readable (an error otherwise)."""
        raise NotImplementedError

    @classmethod
    def answer_batches(cls, model, tokenizers, examples, batch_size: int, workers: int, config: RunConfig,
                       feature_cache=None) -> tuple[DataLoader, AnswerBatches]:
        """The loader over collated evaluation batches, and how they feed evaluation/answers.py."""
        raise NotImplementedError

    # ---- training ---------------------------------------------------------------------------------

    def prepare(self, env: StepEnv, say=print):
        """Nothing to precompute before the first step."""

    def lengths(self) -> None:
        """No bucketing by length."""
        return None

    def forward_strategy(self, targets: list[str]) -> None:
        """One forward path: --diagnose check 7's own findings suffice."""
        return None

    def read_examples(self, problems_of, config: RunConfig, say):
        """Read the train and eval data (tasks/inputs.py read_data), check them with `problems_of` (before
        training, for every line), and keep what can be used: a train line that cannot be read or used is an
        error, or under --on-bad-... skip a counted skip (self.skipped_up_front); any eval problem is an error.
        Sets self.order (the shard-aware order of WebDataset shards, else None), self.config (with the training
        data's fingerprint); returns (train examples, eval examples or None)."""
        src = config.sources
        bad_lines = []  # lines that cannot be read: all reported, an error under fail, skipped under skip
        source = read_data(config, src.train_data, src.train_audio_dir, bad_lines)
        examples = source.examples
        problems = [(line, line.reason) for line in bad_lines] + problems_of(examples)
        self.skipped_up_front = report_problems(problems, src.train_data, config.data.on_bad_input, "train", "example",
                                                self.input_flag, say)
        bad = {(item.source, item.line) for item, _ in problems}  # one example a line (a row, a shard sample)
        examples = [e for e in examples if (e.source, e.line) not in bad]
        if not examples:
            raise TrainingError(f"no example of {src.train_data} is left to train on: every one was skipped "
                                "(listed above)")
        self.order = source.order_for(examples)
        self.config = config.replace(train_data_sha256=data_fingerprint(source))
        eval_examples = None
        if src.eval_data:
            eval_examples = read_data(config, src.eval_data, src.eval_audio_dir).examples
            report_problems(problems_of(eval_examples), src.eval_data, "fail", "eval", "example", self.input_flag, say)
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

    def evaluate(self, model: nn.Module, batch_size: int, workers: int, precision: str,
                 progress: bool = False) -> dict | None:
        """Answers on the eval manifest, during training (None without one)."""
        if self.eval_examples is None:
            return None
        device = next(model.parameters()).device
        loader, spec = self.answer_batches(model, self.tokenizers, self.eval_examples, batch_size, workers, self.config,
                                           getattr(self, "feature_cache", None))
        return evaluate_answers(model, loader, spec, device=device, precision=precision,
                                max_new_tokens=self.max_new_tokens, progress=progress, wer=self.report_wer)

    # ---- a trained run, for eval.py ------------------------------------------------------------

    @classmethod
    def load_trained(cls, run_dir, config: RunConfig, device, with_adapter: bool = True):
        """(model, tokenizers) of a finished run: the base with the quantization it was trained over, its heads,
        its adapter (unless with_adapter=False), held as config.precision holds a run's weights
        (common/precision.py)."""
        model = cls.load_model(config.sources.model, config.model.language_model_dtype, Quantize.of_run(config.model))
        heads = RunDirectory(run_dir).load_heads(model)
        if with_adapter:
            load_adapter(model, run_dir)
        freeze_as_trained(model, heads, Precision(config.precision).frozen_dtype)
        return model.to(device).eval(), cls.load_tokenizers(config.sources.model)

    @classmethod
    def evaluate_file(cls, model, tokenizers, config: RunConfig, data: str, audio_dir=None, *, batch_size: int,
                      workers: int, device, max_new_tokens: int | None = None, feature_cache=None, **_) -> dict:
        """Answers on a manifest given to eval.py; every file must be readable."""
        examples = cls.read_eval_examples(config, data, audio_dir)
        loader, spec = cls.answer_batches(model, tokenizers, examples, batch_size, workers, config, feature_cache)
        return evaluate_answers(model, loader, spec, device=device, precision=config.precision,
                                max_new_tokens=max_new_tokens or cls.max_new_tokens, wer=cls.report_wer)

    format = staticmethod(format_answers)
