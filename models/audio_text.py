"""The audio-text dual encoder trained with a symmetric contrastive loss (CLAP-style).

Papers: Radford et al. 2021 (CLIP) for the symmetric InfoNCE with a learnable temperature;
Elizalde et al. 2023 and Wu et al. 2023 (CLAP, LAION-CLAP) for its audio-text form. The towers
are this repository's ports (models/qwen2_audio_encoder.py, models/bert.py); the heads are new.

    log-mel (B, n_mels, T), frame_mask (B, T)
      -> audio_tower (Qwen2-Audio encoder, LoRA on its attention)   (B, T_out, D_audio)
      -> mean over the valid output frames only                     (B, D_audio)
      -> audio_proj -> L2 normalise                                 (B, E)
    token ids (B, L), attention_mask (B, L)
      -> text_tower (BERT) -> mean over real tokens -> text_proj -> L2 normalise   (B, E)
    logits = exp(logit_scale) * audio @ text.T                      (B, B)
    loss = (cross-entropy over texts + cross-entropy over clips) / 2

Across several ranks or micro-batches the loss is taken over the whole global batch instead:
models/contrastive.py (gather with gradients, GradCache), driven by data/tasks.py.

The children are named `audio_tower`, `text_tower`, `audio_proj`, `text_proj`, `logit_scale`,
so a target such as 'audio_tower.*self_attn.(q|k|v|o)_proj' selects the audio attention.

Two encoding strategies for the audio side (train.py --encoding-strategy):
- audio_tower (default): the path above. Only the checkpoint's `audio_tower.*` shards are read.
- full_forward: the whole Qwen2-Audio (models/qwen2_audio.py) encodes the clip. Its parts sit here
  under the checkpoint's names (`audio_tower`, `multi_modal_projector`, `language_model`), so LoRA
  targets on 'language_model.*' train:
      log-mel -> audio_tower -> multi_modal_projector                (B, T_out, D_lm)
      [fixed chat prompt up to <|audio_bos|>; one <|AUDIO|> per valid output] -> place_audio
      -> language_model.model (causal, final norm)                   (B, P + T_out, D_lm)
      -> mean over the audio positions -> audio_proj -> L2 normalise (B, E)
  The prompt stops at the audio on purpose: attention is causal, so text after the clip could not
  change the hidden states at its positions, and would only cost compute.
"""

import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.precision import Precision
from common.run_files import RUN_CONFIG, RunDirectory
from lora.adapter import load_adapter
from lora.inject import freeze_as_trained
from models.audio import BatchFeatures
from models.bert import mean_pool
from models.contrastive import caption_keys, contrastive_loss, contrastive_targets
from models.loading import load_audio_encoder, load_text_encoder, load_tokenizer
from models.qwen2_audio import (AUDIO_BOS, Qwen2AudioForConditionalGeneration, chat_prompt, load_qwen2_audio,
                                load_qwen2_audio_tokenizer, place_audio, project_audio)
from models.shard_loading import Quantize
from models.text_cache import TEXT_CHUNK, canonical_chunks
from models.tokenizer import tokenize

INIT_TEMPERATURE = 0.07  # CLIP's initial softmax temperature
SHORT_INPUT_BATCHES = 4  # embed_* show no progress bar for this many batches or fewer


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor  # scalar
    logits: torch.Tensor  # (B, B): clip i against caption j, temperature applied
    audio_embeds: torch.Tensor  # (B, E), unit length
    text_embeds: torch.Tensor  # (B, E), unit length
    logit_scale: torch.Tensor  # the parameter itself, so a loss over the global batch can use it


def pool_valid_frames(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of each row's first lengths[b] frames, (B, T, D) -> (B, D); padded frames never count."""
    valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]  # (B, T)
    return mean_pool(hidden, valid)


class AudioTextModel(nn.Module):
    # Attached by load_run, read by embed_audio / embed_text. A model built in memory (train.py's)
    # keeps these defaults and its callers pass a tokenizer and a precision explicitly.
    tokenizer = None  # the text tower's tokenizers.Tokenizer
    precision = "fp32"  # the run's --precision: embed_* compute under its autocast
    pad_to_30s = False  # the run's --pad-to-30s front end
    run_dir = None  # the train.py output directory it was loaded from

    def __init__(self, audio_tower: nn.Module, text_tower: nn.Module, embed_dim: int = 256,
                 full_model: Qwen2AudioForConditionalGeneration | None = None, audio_prompt_ids: list[int] = ()):
        """With `full_model` (and its tokenized `audio_prompt_ids`, see `full_forward_prompt_ids`) the audio
        side is the whole Qwen2-Audio (--encoding-strategy full_forward); `audio_tower` must be its tower."""
        super().__init__()
        self.encoding_strategy = "audio_tower" if full_model is None else "full_forward"
        self.audio_tower = audio_tower
        audio_width = audio_tower.config.d_model
        if full_model is not None:  # the checkpoint's own names, so 'language_model.*' targets select its layers
            if full_model.audio_tower is not audio_tower:
                raise ValueError("full_forward: audio_tower must be full_model.audio_tower")
            self.multi_modal_projector = full_model.multi_modal_projector
            self.language_model = full_model.language_model
            self.audio_token_id, self.audio_prompt_ids = full_model.config.audio_token_id, list(audio_prompt_ids)
            audio_width = full_model.language_model.config.hidden_size
        self.text_tower = text_tower
        self.audio_proj = nn.Linear(audio_width, embed_dim)
        self.text_proj = nn.Linear(text_tower.config.hidden_size, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE)))

    def encode_audio(self, features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) log-mel and (B, T) frame mask -> (B, E) unit-length audio embeddings."""
        if self.encoding_strategy == "full_forward":
            pooled = self.pool_full_forward(features, frame_mask)  # (B, D_lm)
        else:
            hidden = self.audio_tower(features, frame_mask)  # (B, T_out, D_audio)
            lengths = self.audio_tower.output_lengths(frame_mask)  # (B,) valid outputs per clip
            pooled = pool_valid_frames(hidden, lengths)  # (B, D_audio)
        return F.normalize(self.audio_proj(pooled.to(self.audio_proj.weight.dtype)), dim=-1)

    def pool_full_forward(self, features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """full_forward: (B, n_mels, T), (B, T) -> (B, D_lm), the language model's last hidden states (after its
        final norm) averaged over each clip's audio positions, the clip placed after the fixed prompt."""
        audio, lengths = project_audio(self.audio_tower, self.multi_modal_projector,
                                       features, frame_mask)  # (B, T_out, D_lm), (B,)
        # one placeholder per output
        rows = [self.audio_prompt_ids + [self.audio_token_id] * n for n in lengths.tolist()]
        # no rows: a micro-batch whose clips were all skipped
        width = max(map(len, rows), default=len(self.audio_prompt_ids))
        # id 0 pads: masked, never read
        input_ids = torch.zeros(len(rows), width, dtype=torch.long, device=features.device)
        attention_mask = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):  # padded on the right: positions count from the prompt's first token
            input_ids[i, : len(row)] = torch.tensor(row, device=features.device)
            attention_mask[i, : len(row)] = 1
        audio_positions = input_ids == self.audio_token_id  # (B, L)
        embeds = place_audio(self.language_model.model.embed_tokens(input_ids), audio_positions,
                             audio, lengths)  # (B, L, D_lm)
        hidden = self.language_model.model(embeds, attention_mask)  # (B, L, D_lm); no lm_head: only states are pooled
        return mean_pool(hidden, audio_positions)  # (B, D_lm)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, E) unit-length text embeddings."""
        return self.project_text(self.pool_text(input_ids, attention_mask))

    def pool_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, D_text): the text tower's output, mean over real tokens.
        While the text tower is frozen this is a fixed function of the caption (models/text_cache.py)."""
        hidden = self.text_tower(input_ids, attention_mask)  # (B, L, D_text)
        return mean_pool(hidden, attention_mask)  # (B, D_text)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D_text) pooled text features -> (B, E) unit-length text embeddings."""
        return F.normalize(self.text_proj(pooled.to(self.text_proj.weight.dtype)), dim=-1)

    def forward(self, features, frame_mask, input_ids, attention_mask, text_pooled=None) -> ContrastiveOutput:
        """The loss of this batch alone, with the embeddings a global-batch loss is built from
        (models/contrastive.py). `text_pooled` (B, D_text) replaces the text tower's run when the
        caller has the frozen tower's pooled features already (models/text_cache.py)."""
        audio = self.encode_audio(features, frame_mask)  # (B, E)
        if text_pooled is None:
            text_pooled = self.pool_text(input_ids, attention_mask)  # (B, D_text)
        text = self.project_text(text_pooled)  # (B, E)
        targets = contrastive_targets(caption_keys(input_ids, attention_mask))  # (B, B)
        loss, logits = contrastive_loss(audio, text, self.logit_scale, targets)
        return ContrastiveOutput(loss, logits, audio, text, self.logit_scale)

    # ---- using a trained model: embeddings of raw audio and text -------------------------------

    @torch.no_grad()
    def embed_audio(self, items, batch_size: int = 32, progress: bool | None = None, workers: int = 0,
                    precision=None, pad_to_30s: bool | None = None, feature_cache=None) -> torch.Tensor:
        """Audio files or 1-D 16 kHz waveforms (numpy or torch) -> (N, E) unit-length embeddings, fp32 on the CPU.

        `batch_size` clips at a time are decoded (in `workers` DataLoader processes when > 0), turned
        into log-mel padded to the batch's longest clip (models/audio.py), and encoded in eval mode
        under the run's precision; `precision` ("fp32", "bf16", "fp16") and `pad_to_30s` override the
        run's. eval.py scores exactly these numbers. `progress`: None shows a bar on a terminal when
        there are more than a few batches, True / False force it on / off. A `feature_cache`
        (data/feature_cache.py) serves the log-mel of files it holds, and keeps new ones. A clip whose
        features are non-finite, or too short for one tower output, is an error naming it.
        """
        single = isinstance(items, (str, os.PathLike)) or (
            isinstance(items, (np.ndarray, torch.Tensor)) and items.ndim == 1)
        items = [items] if single else list(items)  # a 2-D array is a batch of equal-length waveforms
        if not items:
            raise ValueError("embed_audio got no clips")
        front_end = BatchFeatures(self.audio_tower.config.num_mel_bins,
                                  self.pad_to_30s if pad_to_30s is None else pad_to_30s,
                                  feature_cache, min_frames=self.audio_tower.min_valid_frames())
        loader = DataLoader(list(enumerate(items)), batch_size=batch_size, num_workers=workers, collate_fn=front_end)
        device = next(self.parameters()).device
        embeddings = []
        with self.inference_context(precision):
            for features, frame_mask in tqdm(loader, desc="embed audio", unit="batch", leave=False,
                                             disable=quiet(progress, len(loader))):
                embeddings.append(self.encode_audio(features.to(device), frame_mask.to(device)).float().cpu())
        return torch.cat(embeddings)  # (N, E)

    @torch.no_grad()
    def embed_text(self, texts, batch_size: int = TEXT_CHUNK, progress: bool | None = None, precision=None,
                   tokenizer=None, text_cache=None) -> torch.Tensor:
        """Texts -> (N, E) unit-length embeddings, fp32 on the CPU, in eval mode, the run's precision (or
        `precision`), with the tokenizer load_run attached (or `tokenizer`).

        Each distinct text is embedded once, in chunks of `batch_size` fixed by the texts themselves
        (models/text_cache.py `canonical_chunks`), so the numbers do not depend on the order of
        `texts`: train.py's evaluations and eval.py get the same bits. A `text_cache` (a frozen text
        tower only) keeps the pooled features, so a text tower run once serves every evaluation."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if tokenizer is None:
            raise ValueError("embed_text needs the text tower's tokenizer: load the model with load_run(run_dir), "
                             "or pass tokenizer=models.load_tokenizer(<text model>)")
        if not texts:
            raise ValueError("embed_text got no texts")
        device = next(self.parameters()).device
        chunks = canonical_chunks(texts, tokenizer, batch_size)
        row = {}  # text -> its embedding
        with self.inference_context(precision):
            for chunk in tqdm(chunks, desc="embed text", unit="batch", leave=False,
                              disable=quiet(progress, len(chunks))):
                input_ids, attention_mask = (t.to(device) for t in tokenize(tokenizer, chunk))  # (B, L) each
                pooled = (self.pool_text(input_ids, attention_mask) if text_cache is None
                          else text_cache.pooled(self.text_tower, chunk, input_ids, attention_mask))  # (B, D_text)
                row.update(zip(chunk, self.project_text(pooled).float().cpu()))
        return torch.stack([row[text] for text in texts])  # (N, E)

    @contextlib.contextmanager
    def inference_context(self, precision: str | None = None):
        """Eval mode (no dropout) and the run's autocast for one embed_* call; the mode is restored after."""
        was_training = self.training
        self.eval()
        try:
            with Precision(self.precision if precision is None else precision).autocast(next(self.parameters()).device):
                yield
        finally:
            self.train(was_training)


ENCODING_STRATEGIES = ("audio_tower", "full_forward")


def full_forward_prompt_ids(tokenizer) -> list[int]:
    """The fixed prompt of full_forward: Qwen2-Audio-Instruct's chat template (models/qwen2_audio.py
    `chat_prompt`) up to and including <|audio_bos|>, where the clip's placeholders follow."""
    text = chat_prompt("")
    return tokenizer.encode(text[: text.index(AUDIO_BOS) + len(AUDIO_BOS)], add_special_tokens=False).ids


def build_audio_text_model(audio_model: str, text_model: str, embed_dim: int = 256, seed: int = 0,
                           encoding_strategy: str = "audio_tower", language_model_dtype=None,
                           quantize: Quantize | None = None) -> AudioTextModel:
    """Both towers from their checkpoints (directory or hub id) plus freshly initialised heads.

    The heads' init is seeded, so a resumed or re-evaluated run rebuilds the same model before
    its saved tensors are loaded. Towers stay fp32 here; train.py's --precision uses autocast.
    encoding_strategy "full_forward" loads the whole Qwen2-Audio as the audio side (its language model
    in `language_model_dtype`, default fp32); "audio_tower" reads only the tower's shards. `quantize`
    (QLoRA) holds the towers' Linear layers in NF4, paths as this model names them ('audio_tower.', ...).
    """
    if encoding_strategy not in ENCODING_STRATEGIES:
        raise ValueError(f"encoding_strategy {encoding_strategy!r}: use one of {', '.join(ENCODING_STRATEGIES)}")
    full_model, prompt_ids = None, []
    if encoding_strategy == "full_forward":
        try:
            full_model = load_qwen2_audio(audio_model, language_model_dtype=language_model_dtype, quantize=quantize)
        except ValueError as error:
            raise ValueError(f"--encoding-strategy full_forward runs the whole Qwen2-Audio, so --audio-model must be "
                             f"a whole Qwen2-Audio checkpoint (e.g. Qwen/Qwen2-Audio-7B-Instruct): {error}") from error
        audio_tower, prompt_ids = (full_model.audio_tower,
                                   full_forward_prompt_ids(load_qwen2_audio_tokenizer(audio_model)))
    else:
        audio_tower = load_audio_encoder(audio_model,
                                         quantize=quantize.under("audio_tower.") if quantize is not None else None)
    text_tower = load_text_encoder(text_model, quantize=quantize.under("text_tower.") if quantize is not None else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AudioTextModel(audio_tower, text_tower, embed_dim, full_model, prompt_ids)


def quiet(progress: bool | None, n_batches: int) -> bool | None:
    """tqdm's `disable` for a bar over n_batches: None lets tqdm show it only on a terminal."""
    if progress is None:
        return True if n_batches <= SHORT_INPUT_BATCHES else None
    return not progress


def load_run(run_dir, device="cpu", precision: str | None = None, with_adapter: bool = True) -> AudioTextModel:
    """The trained audio-text model of a train.py output directory, in eval mode, ready for embed_*.

    Rebuilds both towers from the checkpoints run_config.json names (with the quantization they were
    trained over), loads heads.safetensors and (unless with_adapter=False) the LoRA adapter, and holds
    the model as its run's precision does (common/precision.py; `precision` overrides it). The model
    carries `tokenizer`, `precision`, `pad_to_30s` and `run_dir`.

        model = load_run("runs/demo")
        audio = model.embed_audio(["a.wav", "b.flac"])          # (2, E), unit length
        text = model.embed_text(["a dog barks", "rain"])         # (2, E)
        similarity = text @ audio.T                              # cosine similarities
    """
    run = RunDirectory(run_dir)
    config = run.read_config()
    if config.task != "audio-text":
        raise ValueError(f"{run / RUN_CONFIG}: task {config.task!r}; load_run rebuilds audio-text runs "
                         "(evaluate this one with eval.py, export it with python -m models.export)")
    model = build_audio_text_model(config.sources.audio_model, config.sources.text_model, config.model.embed_dim,
                                   seed=config.optim.seed, encoding_strategy=config.model.encoding_strategy,
                                   language_model_dtype=config.model.language_model_dtype,
                                   quantize=Quantize.of_run(config.model))
    heads = run.load_heads(model)
    if with_adapter:
        load_adapter(model, run.path)
    precision = Precision(precision or config.precision)
    freeze_as_trained(model, heads, precision.frozen_dtype)
    model.tokenizer = load_tokenizer(config.sources.text_model)
    model.precision, model.pad_to_30s, model.run_dir = precision.name, config.model.pad_to_30s, run.path
    return model.to(device).eval()
