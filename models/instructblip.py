"""InstructBLIP: a frozen ViT and a frozen T5 bridged by a Q-Former that reads the instruction.

Paper: Dai et al. 2023, "InstructBLIP: Towards General-purpose Vision-Language Models with
Instruction Tuning" (arXiv 2305.06500), on BLIP-2 (Li et al. 2023). Composed by hand after
transformers' `InstructBlipForConditionalGeneration`; the pieces are this repository's ports.

    pixel_values (B, 3, S, S) -> vision_model (ViT, frozen)                      (B, 1 + N, D_v)
    query_tokens (1, Q, D_q) expanded, qformer_input_ids (B, L_q) the instruction
      -> qformer: self-attention over [queries; instruction], cross-attention to the image
         for the queries only                                                 (B, Q + L_q, D_q)
      -> first Q rows -> language_projection                                  (B, Q, D_t5)
    input_ids (B, L) the prompt -> language_model.shared                      (B, L, D_t5)
    inputs_embeds = [projected queries; prompt embeddings], mask [ones(Q); attention_mask]
      -> T5 encoder -> T5 decoder with labels (the answer) -> logits, loss

The explicit `inputs_embeds` is the point: the T5 encoder takes embeddings as a first-class
argument, so nothing has to smuggle them through a forward that does not accept them.
`input_ids` is the prompt alone. transformers 5 spells the same sequence as Q image-token
placeholders in front of the prompt, replaced by the query embeddings inside its forward; the
tests check that both give the same logits.
"""

from dataclasses import dataclass

import torch
from torch import nn

from models.blip_vision import BlipVisionConfig, BlipVisionModel
from models.checkpoint import Checkpoint, load_into, resolve_dtype
from models.qformer import QFormerConfig, QFormerModel
from models.t5 import Seq2SeqLMOutput, T5ForConditionalGeneration, load_t5

CHILDREN = ("vision_model", "qformer", "language_projection", "language_model")  # + query_tokens, a bare Parameter


@dataclass(frozen=True)
class InstructBlipConfig:
    num_query_tokens: int  # Q: learned queries, the only image summary the language model sees (32)
    vision: BlipVisionConfig
    qformer: QFormerConfig
    text_config: dict  # T5's own fields; read by models/t5.py

    @classmethod
    def from_hf(cls, cfg: dict) -> "InstructBlipConfig":
        if cfg.get("model_type") != "instructblip":
            raise ValueError(f"config.json has model_type {cfg.get('model_type')!r}; load_instructblip reads 'instructblip' checkpoints")
        text = cfg.get("text_config") or {}
        if text.get("model_type", "t5") != "t5":
            raise ValueError(f"text_config has model_type {text.get('model_type')!r}: only T5 language models (flan-t5) are ported here, not decoder-only ones")
        return cls(cfg.get("num_query_tokens", 32), BlipVisionConfig.from_hf(cfg), QFormerConfig.from_hf(cfg), text)


class InstructBlip(nn.Module):
    def __init__(self, config: InstructBlipConfig, language_model: T5ForConditionalGeneration):
        super().__init__()
        self.config = config
        self.vision_model = BlipVisionModel(config.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer.hidden_size))
        self.qformer = QFormerModel(config.qformer)
        self.language_projection = nn.Linear(config.qformer.hidden_size, language_model.config.d_model)
        self.language_model = language_model

    def query_embeddings(self, pixel_values, qformer_input_ids, qformer_attention_mask) -> torch.Tensor:
        """Image and instruction -> (B, Q, D_t5): the Q soft tokens put in front of the prompt."""
        image_embeds = self.vision_model(pixel_values)  # (B, 1 + N, D_v)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (1, Q, D_q) -> (B, Q, D_q)
        hidden = self.qformer(queries, qformer_input_ids, qformer_attention_mask, image_embeds)  # (B, Q + L_q, D_q)
        hidden = hidden[:, : self.config.num_query_tokens]  # the query rows; the instruction rows are not used
        return self.language_projection(hidden.to(self.language_projection.weight.dtype))  # (B, Q, D_t5)

    def encoder_inputs(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask):
        """[queries; prompt] embeddings (B, Q + L, D_t5) and their mask (B, Q + L)."""
        queries = self.query_embeddings(pixel_values, qformer_input_ids, qformer_attention_mask)
        prompt = self.language_model.shared(input_ids)  # (B, L, D_t5)
        embeds = torch.cat([queries.to(prompt.dtype), prompt], dim=1)  # (B, Q + L, D_t5)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = torch.ones(queries.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return embeds, torch.cat([ones, attention_mask], dim=1)  # every query is attended to

    def forward(self, pixel_values, qformer_input_ids, qformer_attention_mask=None, input_ids=None,
                attention_mask=None, labels=None, decoder_input_ids=None) -> Seq2SeqLMOutput:
        """-> .logits (B, T, V) and .loss (cross-entropy on labels != -100), also as out["logits"]."""
        embeds, mask = self.encoder_inputs(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, decoder_input_ids=decoder_input_ids)

    @torch.no_grad()
    def generate(self, pixel_values, qformer_input_ids, qformer_attention_mask=None, input_ids=None,
                 attention_mask=None, max_new_tokens: int = 20) -> torch.Tensor:
        """Greedy answer ids (B, 1 + n): the decoder start token, then up to max_new_tokens tokens."""
        embeds, mask = self.encoder_inputs(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens)


def instructblip_prefix(checkpoint: Checkpoint) -> str:
    """'' for the hub layout (`vision_model.*`), 'model.' when a saver nested it under a base model."""
    for prefix in ("", "model."):
        if f"{prefix}query_tokens" in checkpoint.weight_map:
            return prefix
    raise ValueError(f"{checkpoint.source} holds no 'query_tokens' tensor: not an InstructBLIP checkpoint "
                     f"(its top-level prefixes are: {', '.join(checkpoint.top_level_prefixes())})")


def load_instructblip(path_or_hub_id, dtype=torch.float32, language_model_dtype=None, revision=None) -> InstructBlip:
    """InstructBLIP from a checkpoint directory or hub id, in eval mode.

    `language_model_dtype` (default: `dtype`) lets the frozen T5 sit in bf16 while the Q-Former,
    which LoRA trains, stays fp32. fp16 is refused for T5: flan-t5 activations overflow fp16.
    """
    checkpoint = Checkpoint.open(path_or_hub_id, revision=revision)
    config = InstructBlipConfig.from_hf(checkpoint.config)
    prefix = instructblip_prefix(checkpoint)
    dtype = resolve_dtype(dtype)
    lm_dtype = resolve_dtype(language_model_dtype or dtype)
    if lm_dtype == torch.float16:
        raise ValueError("fp16 for the T5 language model is refused: flan-t5 activations overflow fp16 (inf/NaN); use bf16 or fp32")
    language_model = load_t5(checkpoint, f"{prefix}language_model.", config.text_config, dtype=lm_dtype)
    with torch.device("meta"):
        model = InstructBlip(config, language_model)
    for name in ("vision_model", "qformer", "language_projection"):
        load_into(getattr(model, name), checkpoint.load_prefix(f"{prefix}{name}.", dtype), f"{checkpoint.source} [{prefix}{name}.*]")
    query_tokens = checkpoint.load_prefix(f"{prefix}query_tokens", dtype)[""]
    if query_tokens.shape != model.query_tokens.shape:
        raise ValueError(f"{checkpoint.source}: query_tokens has shape {tuple(query_tokens.shape)}, the config implies {tuple(model.query_tokens.shape)}")
    model.query_tokens = nn.Parameter(query_tokens)
    return model.eval()
