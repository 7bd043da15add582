"""Qwen2-Audio, the whole model: audio tower -> projector -> the Qwen2 language model.

Paper: Chu et al. 2024, "Qwen2-Audio Technical Report" (arXiv 2407.10759). Ported by hand from
transformers 5 `Qwen2AudioForConditionalGeneration` (models/qwen2_audio/modeling_qwen2_audio.py)
and its `Qwen2AudioProcessor` (processing_qwen2_audio.py); the parts are this repository's ports.

    input_features (N, n_mels, T), feature_attention_mask (N, T)    one clip per run of placeholders
      -> audio_tower (models/qwen2_audio_encoder.py)                 (N, T_out, D_audio)
      -> multi_modal_projector.linear                                (N, T_out, D_lm)
      -> clip n's first output_lengths[n] rows, clip after clip       (sum of lengths, D_lm)
    input_ids (B, L), <|AUDIO|> written output_lengths[n] times for clip n (the processor's expansion)
      -> language_model.model.embed_tokens                           (B, L, D_lm)
      -> the audio rows written over the placeholders, in reading order (`place_audio`)
      -> language_model (Qwen2, models/llama.py) -> loss on labels != -100 from the scored positions alone
         (models/lm_loss.py: the 750 placeholders of a 30 s clip never meet the 156,032-word vocabulary);
         logits (B, L, V) only if read

Quirks of the reference, copied or accounted for:
- The processor, not the model, expands each <|AUDIO|> into one placeholder per audio-tower
  output: ((L - 1) // 2 + 1 - 2) // 2 + 1 for L valid log-mel frames (`audio_token_count`), the
  tower's `output_lengths`. transformers still has a legacy path (one placeholder per clip,
  expanded inside the model); it is not ported, and a single placeholder per clip is an error here.
- The encoder's attention mask comes from feature_attention_mask's row sums: keys past
  (L - 1) // 2 + 1 conv frames are masked (models/qwen2_audio_encoder.py does the same). The
  reference insists on 3000 frames; we take the batch's longest clip + 2 (models/audio.py), whose
  valid outputs are the same, or 3000 with --pad-to-30s.
- The reference loss skips positions whose attention_mask is 0; we set their labels to -100,
  which removes the same terms.
- Its forward numbers positions 0..L-1 whatever the padding; its generate numbers them from the
  mask, as models/llama.py always does. Rotary embeddings see only differences of positions, so a
  left-padded row gets the same logits either way (tested to 1e-5).
- Module names are the hub checkpoint's keys (`audio_tower.*`, `multi_modal_projector.linear.*`,
  `language_model.model.*`, `language_model.lm_head.weight`); transformers 5 renames them in memory
  (`model.language_model.*`) but save_pretrained writes these.

The chat format of Qwen2-Audio-7B-Instruct is written out in `chat_prompt`.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from models.checkpoint import Checkpoint, resolve_dtype
from models.llama import CausalLMOutput, LlamaConfig, LlamaForCausalLM, load_llama
from models.qwen2_audio_encoder import Qwen2AudioEncoder, Qwen2AudioEncoderConfig
from models.shard_loading import Quantize, load_weights

AUDIO, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TOKENS = (AUDIO, AUDIO_BOS, AUDIO_EOS, IM_START, IM_END, END_OF_TEXT)
DEFAULT_SYSTEM = "You are a helpful assistant."  # what the template writes when no system turn is given


def chat_prompt(question: str, system: str = DEFAULT_SYSTEM) -> str:
    """One user turn (a clip, then the question) in Qwen2-Audio-7B-Instruct's chat format, up to where the
    assistant's answer starts. Its chat_template (chat_template.json of the checkpoint, the same as
    transformers' Qwen2AudioProcessor.default_chat_template) renders messages
    [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]}]
    with add_generation_prompt=True as:

        <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
        <|im_start|>user\\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\\n{question}<|im_end|>\\n
        <|im_start|>assistant\\n

    The answer follows and ends with <|im_end|>, where the model stops (generation_config's eos).
    The single <|AUDIO|> is expanded per clip later (`expand_audio_placeholder`)."""
    return (f"{IM_START}system\n{system}{IM_END}\n"
            f"{IM_START}user\nAudio 1: {AUDIO_BOS}{AUDIO}{AUDIO_EOS}\n{question}{IM_END}\n"
            f"{IM_START}assistant\n")


def audio_token_count(valid_frames: int) -> int:
    """Placeholders (= audio-tower outputs) for a clip of `valid_frames` log-mel frames: conv2 halves
    the frames ((L - 1) // 2 + 1), the pool keeps whole pairs ((L' - 2) // 2 + 1); the processor's formula."""
    return ((valid_frames - 1) // 2 + 1 - 2) // 2 + 1


def expand_audio_placeholder(ids: list[int], audio_token_id: int, n_audio: int) -> list[int]:
    """Token ids holding one <|AUDIO|> -> the same ids with it written n_audio times, as transformers 5's
    processor expands `<|AUDIO|>` in the text before tokenizing (each copy is one special token)."""
    at = [i for i, token in enumerate(ids) if token == audio_token_id]
    if len(at) != 1:
        raise ValueError(f"the prompt holds {len(at)} {AUDIO} tokens; one clip per example needs exactly one "
                         f"(is {AUDIO} written in the question itself?)")
    return ids[: at[0]] + [audio_token_id] * n_audio + ids[at[0] + 1:]


@dataclass(frozen=True)
class Qwen2AudioConfig:
    audio: Qwen2AudioEncoderConfig
    text_config: dict  # the Qwen2 language model's fields; read by models/llama.py
    audio_token_id: int = 151646  # <|AUDIO|> in Qwen2-Audio's vocabulary

    @classmethod
    def from_hf(cls, cfg: dict) -> "Qwen2AudioConfig":
        if cfg.get("model_type") != "qwen2_audio" or not cfg.get("text_config"):
            raise ValueError(f"config.json has model_type {cfg.get('model_type')!r}"
                             f"{'' if cfg.get('text_config') else ' and no text_config'}: the whole Qwen2-Audio "
                             "needs a 'qwen2_audio' checkpoint with its language model "
                             "(e.g. Qwen/Qwen2-Audio-7B-Instruct)")
        text = dict(cfg["text_config"])
        text.setdefault("model_type", "qwen2")
        # transformers saves `audio_token_index` (its attribute_map calls it audio_token_id)
        token = cfg.get("audio_token_index", cfg.get("audio_token_id", 151646))
        return cls(Qwen2AudioEncoderConfig.from_hf(cfg), text, int(token))


class MultiModalProjector(nn.Module):
    """One Linear (with bias) from the tower's width to the language model's, as `multi_modal_projector.linear`."""

    def __init__(self, d_audio: int, d_lm: int):
        super().__init__()
        self.linear = nn.Linear(d_audio, d_lm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def project_audio(audio_tower: Qwen2AudioEncoder, multi_modal_projector: MultiModalProjector,
                  input_features: torch.Tensor,
                  feature_attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips -> (audio (N, T_out, D_lm), lengths (N,)): row n is valid up to lengths[n] = its placeholders."""
    frame_mask = feature_attention_mask.bool()  # (N, T), 1 on valid frames, which come first
    hidden = audio_tower(input_features, frame_mask)  # (N, T_out, D_audio), keys past each clip masked
    return multi_modal_projector(hidden), audio_tower.output_lengths(frame_mask)


def place_audio(text_embeds: torch.Tensor, audio_positions: torch.Tensor, audio: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
    """Write the clips' valid audio rows over the placeholder positions: transformers'
    `inputs_embeds.masked_scatter(mask, audio_features)`, spelled out.

    text_embeds (B, L, D) embeds every token, placeholders included (their rows are overwritten);
    audio_positions (B, L) bool marks the placeholders; audio (N, T_out, D) and lengths (N,) as from
    `project_audio`. The k-th placeholder in reading order (row by row, left to right) gets the k-th
    valid audio row (clip by clip, frame by frame), so clip n must own the n-th run of placeholders.
    Out of place: gradients reach both the text embeddings and the audio rows."""
    valid = torch.arange(audio.shape[1], device=audio.device)[None, :] < lengths[:, None]  # (N, T_out)
    rows = audio[valid]  # (sum of lengths, D): clip 0's valid rows, then clip 1's, ...
    batch_index, position = audio_positions.nonzero(as_tuple=True)  # (P,) each, in reading order
    if len(position) != len(rows):
        hint = (f"; {len(position)} placeholders for {audio.shape[0]} clips looks like the legacy spelling, one per "
                "clip: write it output_lengths[n] times for clip n, as transformers 5's processor does "
                "(models/qwen2_audio.py expand_audio_placeholder)") if len(position) == audio.shape[0] else ""
        raise ValueError(f"input_ids hold {len(position)} audio placeholders but the clips give {len(rows)} audio "
                         f"rows (output lengths {lengths.tolist()}){hint}")
    return text_embeds.index_put((batch_index, position), rows.to(text_embeds.dtype))  # (B, L, D)


class Qwen2AudioForConditionalGeneration(nn.Module):
    def __init__(self, config: Qwen2AudioConfig, language_model: LlamaForCausalLM):
        super().__init__()
        self.config = config
        self.audio_tower = Qwen2AudioEncoder(config.audio)
        self.multi_modal_projector = MultiModalProjector(config.audio.d_model, language_model.config.hidden_size)
        self.language_model = language_model

    def inputs_embeds(self, input_ids, input_features=None, feature_attention_mask=None) -> torch.Tensor:
        """(B, L) token ids with expanded placeholders, and the clips -> (B, L, D_lm) language-model input."""
        text = self.language_model.model.embed_tokens(input_ids)  # (B, L, D_lm)
        audio_positions = input_ids == self.config.audio_token_id  # (B, L)
        if input_features is None:
            if audio_positions.any():
                raise ValueError("input_ids hold audio placeholders but no input_features were given")
            return text
        if feature_attention_mask is None:  # every frame valid: clips padded to 30 s by the caller
            feature_attention_mask = torch.ones(input_features.shape[0], input_features.shape[-1], dtype=torch.long,
                                                device=input_features.device)
        audio, lengths = project_audio(self.audio_tower, self.multi_modal_projector, input_features,
                                       feature_attention_mask)
        return place_audio(text, audio_positions, audio, lengths)

    def forward(self, input_ids, input_features=None, attention_mask=None, feature_attention_mask=None,
                labels=None, position_ids=None, segment_ids=None) -> CausalLMOutput:
        """transformers' arguments, in its order -> .loss (mean next-token cross entropy over labels != -100 on
        attended positions; logits at t score labels at t + 1) and .logits (B, L, V), computed only if read
        (models/llama.py CausalLMOutput). Padding on either side.

        Packed rows (data/audio_qa.py collate_audio_qa(pack=...)): input_ids (R, L) hold several examples a row,
        segment_ids (R, L) number them (0 = padding) and position_ids (R, L) restart at 0 for each; the clips are
        in the order their examples are read (row by row, left to right), so `place_audio` puts each clip on
        its own example's placeholders unchanged. The attention is block-diagonal causal (models/llama.py)."""
        embeds = self.inputs_embeds(input_ids, input_features, feature_attention_mask)
        if labels is not None and attention_mask is not None:  # the reference drops unattended targets
            labels = labels.masked_fill(attention_mask == 0, -100)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                                   position_ids=position_ids, segment_ids=segment_ids)

    @torch.no_grad()
    def generate(self, input_ids, input_features=None, attention_mask=None, feature_attention_mask=None,
                 max_new_tokens: int = 20, eos_token_id: int | tuple[int, ...] | None = None) -> torch.Tensor:
        """Greedy answer ids (B, n): the new tokens only (transformers returns the prompt before them).
        Pad prompts on the LEFT, so every row continues right after its own last token. eos_token_id, one id
        or several: where rows stop, by default the text_config's; pass the id the answers were trained to end
        with and generation_config.json's (models/loading.py `load_special_tokens(...).eos_ids`)."""
        embeds = self.inputs_embeds(input_ids, input_features, feature_attention_mask)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)


def language_side_linear_paths(config: dict | None = None) -> list[str]:
    """The Linear module paths of a Qwen2-Audio's projector and language model: what the audio-tower
    strategy never runs (nor loads). Built on the meta device, so a 7B layout costs no memory;
    without a usable config, Qwen2's default layout (32 layers) names them."""
    text = (config or {}).get("text_config") or {"model_type": "qwen2"}
    cfg = LlamaConfig.from_hf({"model_type": "qwen2", **text})
    with torch.device("meta"):
        language_model = LlamaForCausalLM(cfg)
    paths = ["multi_modal_projector.linear"]
    return paths + [f"language_model.{p}" for p, m in language_model.named_modules() if isinstance(m, nn.Linear)]


def load_qwen2_audio(path_or_hub_id: str | Path, dtype: str | torch.dtype = torch.float32, language_model_dtype=None,
                     revision: str | None = None,
                     quantize: Quantize | None = None) -> Qwen2AudioForConditionalGeneration:
    """The whole Qwen2-Audio (e.g. Qwen/Qwen2-Audio-7B-Instruct) from a checkpoint directory or hub id, sharded
    or not, in eval mode. `language_model_dtype` (default: `dtype`) holds the 7B language model in bf16 while
    the tower and projector stay in `dtype` (LoRA weights are added later, in fp32, by lora/). With `quantize`
    (QLoRA) the Linear layers it does not keep are held in NF4, the language model's as its shards are read."""
    checkpoint = Checkpoint.open(path_or_hub_id, revision=revision)
    config = Qwen2AudioConfig.from_hf(checkpoint.config)
    if "language_model.model.embed_tokens.weight" not in checkpoint.weight_map:
        raise ValueError(f"{checkpoint.source} holds no 'language_model.model.embed_tokens.weight': not a whole "
                         "Qwen2-Audio in the hub layout (its top-level prefixes are: "
                         f"{', '.join(checkpoint.top_level_prefixes())}); "
                         "an audio tower alone serves --encoding-strategy audio_tower, not the whole model")
    dtype = resolve_dtype(dtype)
    language_model = load_llama(checkpoint, "language_model.", config.text_config,
                                dtype=resolve_dtype(language_model_dtype or dtype),
                                quantize=quantize.under("language_model.") if quantize is not None else None)
    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(config, language_model)
    for name in ("audio_tower", "multi_modal_projector"):  # with quantize, streamed: their Linears NF4 as they are read
        load_weights(getattr(model, name), checkpoint, f"{name}.", dtype,
                     quantize.under(f"{name}.") if quantize is not None else None)
    return model.eval()


def load_qwen2_audio_tokenizer(path_or_hub_id: str | Path, revision: str | None = None) -> Tokenizer:
    """The checkpoint's tokenizer.json (Qwen2's byte-level BPE with the chat and audio special tokens), as is:
    no truncation, no padding (the collate builds every row itself). No weights are read."""
    checkpoint = Checkpoint.open(path_or_hub_id, revision=revision, weights=False)
    path = checkpoint.file("tokenizer.json", required=False)
    if path is None:
        raise FileNotFoundError(f"{checkpoint.source} ships no tokenizer.json; write it once with python -c "
                                "\"from transformers import AutoTokenizer; "
                                "AutoTokenizer.from_pretrained('MODEL').save_pretrained('DIR')\" and copy "
                                "DIR/tokenizer.json beside config.json")
    tokenizer = Tokenizer.from_file(str(path))
    missing = [token for token in CHAT_TOKENS if tokenizer.token_to_id(token) is None]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a Qwen2-Audio tokenizer")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer
