"""InstructBLIP: a frozen ViT and a frozen language model (T5 or Vicuna) bridged by a Q-Former that
reads the instruction.

Paper: Dai et al. 2023, "InstructBLIP: Towards General-purpose Vision-Language Models with
Instruction Tuning" (arXiv 2305.06500), on BLIP-2 (Li et al. 2023). Composed by hand after
transformers' `InstructBlipForConditionalGeneration` and LAVIS's `blip2_t5_instruct` /
`blip2_vicuna_instruct`; the pieces are this repository's ports.

    pixel_values (B, 3, S, S) -> vision_model (ViT, frozen)                      (B, 1 + N, D_v)
    query_tokens (1, Q, D_q) expanded, qformer_input_ids (B, L_q) the instruction
      -> qformer: self-attention over [queries; instruction], cross-attention to the image
         for the queries only                                                 (B, Q + L_q, D_q)
      -> first Q rows -> language_projection                                  (B, Q, D_lm)
    input_ids (B, L) -> the language model's embedding table                  (B, L, D_lm)
    inputs_embeds = [projected queries; text embeddings], mask [ones(Q); attention_mask]

    T5 (flan-t5):   input_ids is the prompt alone -> T5 encoder; labels (the answer + </s>) ->
                    T5 decoder -> logits (B, La, V) over the answer, loss
    LLaMA (Vicuna): input_ids is prompt + answer + </s> in one sequence, labels aligned with it
                    (-100 on the prompt and padding) -> causal decoder over [queries; text]
                    -> logits (B, L, V) over the text positions; next-token loss on the answer,
                    from the answer positions alone (models/lm_loss.py): in training neither the
                    Q query positions nor the prompt are projected onto the vocabulary

The explicit `inputs_embeds` is the point: both language models take embeddings as a first-class
argument, so nothing has to smuggle them through a forward that does not accept them.
transformers 5 spells the same sequence as Q image-token placeholders in front of the text,
replaced by the query embeddings inside its forward; for the decoder-only LM its labels then
cover the placeholders too (-100). The tests check that both give the same logits and loss.

Generation (greedy, KV cache) differs by LM: T5 decodes from its start token, so its output
begins with that token; LLaMA continues [queries; prompt], and returns the new tokens only.
A batch of prompts for the decoder-only LM is padded on the left (data/instructblip.py), as LAVIS
and transformers do, so every row's first new token follows its own last prompt token; the padding
then sits between the queries and the prompt, and positions come from the mask (models/llama.py).

Packed training rows (decoder-only LM, `packed_forward`): several examples end to end in one row of the
language model's input, each [Q query slots; BOS prompt answer eos] with its own positions from 0 and a
block-diagonal causal attention; the query slots hold QUERY_SLOT and receive their example's queries.
"""

from dataclasses import dataclass

import torch
from torch import nn

from models.blip_vision import BlipVisionConfig, BlipVisionModel
from models.checkpoint import Checkpoint, load_into, resolve_dtype
from models.attention import segment_positions
from models.llama import CausalLMOutput, LlamaForCausalLM, load_llama
from models.qformer import QFormerConfig, QFormerModel
from models.shard_loading import Quantize, load_weights, quantize_linears
from models.t5 import Seq2SeqLMOutput, T5ForConditionalGeneration, load_t5

CHILDREN = ("vision_model", "qformer", "language_projection", "language_model")  # + query_tokens, a bare Parameter
LANGUAGE_MODELS = ("t5", "llama")  # flan-t5-xl/xxl; vicuna-7b/13b
QUERY_SLOT = -1  # packed rows: the id of the positions the queries are written over (no vocabulary has it)


@dataclass(frozen=True)
class InstructBlipConfig:
    num_query_tokens: int  # Q: learned queries, the only image summary the language model sees (32)
    vision: BlipVisionConfig
    qformer: QFormerConfig
    text_config: dict  # the language model's own fields; read by models/t5.py or models/llama.py

    @classmethod
    def from_hf(cls, cfg: dict) -> "InstructBlipConfig":
        if cfg.get("model_type") != "instructblip":
            raise ValueError(f"config.json has model_type {cfg.get('model_type')!r}; load_instructblip reads "
                             "'instructblip' checkpoints")
        text = cfg.get("text_config") or {}
        if text.get("model_type", "t5") not in LANGUAGE_MODELS:
            raise ValueError(f"text_config has model_type {text.get('model_type')!r}: the ported language models are "
                             f"{', '.join(LANGUAGE_MODELS)} (InstructBLIP flan-t5 and vicuna)")
        return cls(cfg.get("num_query_tokens", 32), BlipVisionConfig.from_hf(cfg), QFormerConfig.from_hf(cfg), text)

    @property
    def decoder_only(self) -> bool:
        """True for Vicuna (LLaMA): prompt and answer form one causal sequence; False for T5."""
        return self.text_config.get("model_type", "t5") == "llama"


class InstructBlip(nn.Module):
    def __init__(self, config: InstructBlipConfig, language_model: T5ForConditionalGeneration | LlamaForCausalLM):
        super().__init__()
        self.config = config
        self.vision_model = BlipVisionModel(config.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer.hidden_size))
        self.qformer = QFormerModel(config.qformer)
        lm_width = language_model.config.hidden_size if config.decoder_only else language_model.config.d_model
        self.language_projection = nn.Linear(config.qformer.hidden_size, lm_width)
        self.language_model = language_model

    def query_embeddings(self, pixel_values, qformer_input_ids, qformer_attention_mask) -> torch.Tensor:
        """Image and instruction -> (B, Q, D_lm): the Q soft tokens put in front of the text."""
        image_embeds = self.vision_model(pixel_values)  # (B, 1 + N, D_v)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (1, Q, D_q) -> (B, Q, D_q)
        hidden = self.qformer(queries, qformer_input_ids, qformer_attention_mask, image_embeds)  # (B, Q + L_q, D_q)
        hidden = hidden[:, : self.config.num_query_tokens]  # the query rows; the instruction rows are not used
        return self.language_projection(hidden.to(self.language_projection.weight.dtype))  # (B, Q, D_lm)

    def language_model_inputs(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask):
        """[queries; text] embeddings (B, Q + L, D_lm) and their mask (B, Q + L)."""
        queries = self.query_embeddings(pixel_values, qformer_input_ids, qformer_attention_mask)
        table = self.language_model.model.embed_tokens if self.config.decoder_only else self.language_model.shared
        text = table(input_ids)  # (B, L, D_lm)
        embeds = torch.cat([queries.to(text.dtype), text], dim=1)  # (B, Q + L, D_lm); a bf16 LM gets bf16 queries
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = torch.ones(queries.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return embeds, torch.cat([ones, attention_mask], dim=1)  # every query is attended to

    def forward(self, pixel_values, qformer_input_ids, qformer_attention_mask=None, input_ids=None,
                attention_mask=None, labels=None, decoder_input_ids=None, position_ids=None,
                segment_ids=None) -> Seq2SeqLMOutput | CausalLMOutput:
        """-> .logits and .loss (cross-entropy on labels != -100), also as out["logits"].

        T5: input_ids the prompt, labels (B, La) the answer; logits (B, La, V) from the decoder.
        LLaMA: input_ids the prompt and answer, labels (B, L) aligned with it; logits (B, L, V) over the
        text positions, computed only if read (the query positions never meet the vocabulary), logits[:, t]
        scored against labels[:, t + 1]; the loss projects only the scored positions (models/lm_loss.py).
        LLaMA, packed rows (`segment_ids` given): see `packed_forward`."""
        if segment_ids is not None:
            return self.packed_forward(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
                                       attention_mask, labels, position_ids, segment_ids)
        embeds, mask = self.language_model_inputs(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
                                                  attention_mask)
        if not self.config.decoder_only:
            return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                                       decoder_input_ids=decoder_input_ids)
        if decoder_input_ids is not None:
            raise ValueError("decoder_input_ids is for the T5 language model; a decoder-only LM reads the answer "
                             "from input_ids")
        Q = self.config.num_query_tokens
        if labels is not None:  # nothing to predict at the query positions: the last one predicts labels[:, 0]
            labels = torch.cat([labels.new_full((labels.shape[0], Q), -100), labels], dim=1)  # (B, Q + L)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        # text rows only
        return CausalLMOutput(last_hidden_state=out.last_hidden_state[:, Q:], head=out.head, loss=out.loss)

    def packed_forward(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask,
                       labels, position_ids, segment_ids) -> CausalLMOutput:
        """Several examples in each row of the decoder-only LM's input (data/instructblip.py collate_vqa(pack=...)).

        input_ids, attention_mask, labels, position_ids, segment_ids (R, W) are in the LM's own coordinates: each
        example is [Q query slots; BOS prompt answer eos], its positions restarting at 0, its segment id k > 0.
        The query slots hold QUERY_SLOT, which no vocabulary has: the example's projected queries are written
        there, as transformers 5 writes them over its image tokens. pixel_values and the Q-Former inputs (N, ...)
        list the examples in the order they are read (row by row, left to right), so the n-th example's queries
        fill the n-th run of slots. -> .loss as unpacked, and last_hidden_state (R, W, D) over the whole rows,
        queries included."""
        if not self.config.decoder_only:
            raise ValueError("packed rows (segment_ids) need a decoder-only language model (Vicuna, LLaMA); flan-t5 "
                             "reads the prompt with its encoder and the answer with its decoder: collate without pack")
        Q = self.config.num_query_tokens
        queries = self.query_embeddings(pixel_values, qformer_input_ids, qformer_attention_mask)  # (N, Q, D_lm)
        if position_ids is None:
            position_ids = segment_positions(segment_ids)
        slots = input_ids == QUERY_SLOT  # (R, W)
        row, column = slots.nonzero(as_tuple=True)  # (N * Q,) each, in reading order
        if len(row) != queries.shape[0] * Q or bool((position_ids[slots] >= Q).any()):
            raise ValueError(f"the packed rows hold {len(row)} query slots, not the first {Q} positions of each of the "
                             f"{queries.shape[0]} examples: collate with num_query_tokens={Q}, the model's "
                             "config.num_query_tokens")
        text = self.language_model.model.embed_tokens(input_ids.masked_fill(slots, 0))  # (R, W, D_lm)
        embeds = text.index_put((row, column), queries.flatten(0, 1).to(text.dtype))  # (N, Q, D) -> (N*Q, D) rows
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                                    position_ids=position_ids, segment_ids=segment_ids)

    @torch.no_grad()
    def generate(self, pixel_values, qformer_input_ids, qformer_attention_mask=None, input_ids=None,
                 attention_mask=None, max_new_tokens: int = 20, eos_token_id: int | tuple[int, ...] | None = None
                 ) -> torch.Tensor:
        """Greedy answer ids. T5: (B, 1 + n), the decoder start token then up to max_new_tokens tokens.
        LLaMA: (B, n), the new tokens only, after a left-padded prompt; `eos_token_id` (default: the
        text_config's), one id or several, is where rows stop: the id the training answers ended with and the
        checkpoint's generation_config.json's (models/loading.py `load_special_tokens(...).eos_ids`)."""
        embeds, mask = self.language_model_inputs(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
                                                  attention_mask)
        if not self.config.decoder_only:
            return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                                max_new_tokens=max_new_tokens)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                            eos_token_id=eos_token_id)


def instructblip_prefix(checkpoint: Checkpoint) -> str:
    """'' for the hub layout (`vision_model.*`), 'model.' when a saver nested it under a base model."""
    for prefix in ("", "model."):
        if f"{prefix}query_tokens" in checkpoint.weight_map:
            return prefix
    raise ValueError(f"{checkpoint.source} holds no 'query_tokens' tensor: not an InstructBLIP checkpoint "
                     f"(its top-level prefixes are: {', '.join(checkpoint.top_level_prefixes())})")


def load_instructblip(path_or_hub_id, dtype=torch.float32, language_model_dtype=None, revision=None,
                      quantize: Quantize | None = None) -> InstructBlip:
    """InstructBLIP from a checkpoint directory or hub id, in eval mode. With `quantize` (QLoRA) the Linear
    layers it does not keep are held in NF4: a Vicuna's as its shards are read, the other parts once loaded.

    `language_model_dtype` (default: `dtype`) lets the frozen language model sit in bf16 while the
    Q-Former, which LoRA trains, stays fp32 (a 7B Vicuna: 13.5 GB instead of 27). fp16 is refused for
    T5 (flan-t5 activations overflow fp16) and allowed for LLaMA (LAVIS runs Vicuna in fp16).
    """
    checkpoint = Checkpoint.open(path_or_hub_id, revision=revision)
    config = InstructBlipConfig.from_hf(checkpoint.config)
    prefix = instructblip_prefix(checkpoint)
    dtype = resolve_dtype(dtype)
    lm_dtype = resolve_dtype(language_model_dtype or dtype)
    if config.decoder_only:
        language_model = load_llama(checkpoint, f"{prefix}language_model.", config.text_config, dtype=lm_dtype,
                                    quantize=quantize.under("language_model.") if quantize is not None else None)
    elif lm_dtype == torch.float16:
        raise ValueError("fp16 for the T5 language model is refused: flan-t5 activations overflow fp16 (inf/NaN); "
                         "use bf16 or fp32")
    else:
        language_model = load_t5(checkpoint, f"{prefix}language_model.", config.text_config, dtype=lm_dtype)
    with torch.device("meta"):
        model = InstructBlip(config, language_model)
    for name in ("vision_model", "qformer"):  # with quantize, streamed: their Linears NF4 as they are read
        load_weights(getattr(model, name), checkpoint, f"{prefix}{name}.", dtype,
                     quantize.under(f"{name}.") if quantize is not None else None)
    load_into(model.language_projection, checkpoint.load_prefix(f"{prefix}language_projection.", dtype),
              f"{checkpoint.source} [{prefix}language_projection.*]")
    query_tokens = checkpoint.load_prefix(f"{prefix}query_tokens", dtype)[""]
    if query_tokens.shape != model.query_tokens.shape:
        raise ValueError(f"{checkpoint.source}: query_tokens has shape {tuple(query_tokens.shape)}, the config implies "
                         f"{tuple(model.query_tokens.shape)}")
    model.query_tokens = nn.Parameter(query_tokens)
    # the rest once loaded: language_projection (a bare Linear of the model) and T5 (flan-t5-xl's 3B load whole:
    # T5's shared-table aliases need every key at once); a Vicuna's Linears already are NF4
    if quantize is not None:
        quantize_linears(model, quantize.keeping("language_model.lm_head"))
    return model.eval()
