r"""The InstructBLIP Q-Former (the `qformer`): a BERT whose extra "query" tokens read the image.

Papers: Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
Encoders and Large Language Models" (ICML), which introduced the Querying Transformer; Dai et
al. 2023, "InstructBLIP: Towards General-purpose Vision-Language Models with Instruction
Tuning" (NeurIPS), which also feeds it the instruction. Ported by hand from transformers v5
`models/instructblip/modeling_instructblip.py` (InstructBlipQFormerEmbeddings,
InstructBlipQFormerMultiHeadAttention, InstructBlipQFormerLayer, InstructBlipQFormerModel), which
follows LAVIS `Qformer.py`, a BERT-base with cross-attention.

    query_embeds (B, Q, D)  the composite model's `query_tokens`, the same Q vectors for every image
    input_ids    (B, L)     the instruction, in the Q-Former's own (BERT) vocabulary
    -> embeddings: [query_embeds; word + position(text)] -> layernorm    (B, Q + L, D)
    -> num_hidden_layers x post-LN block:
         self-attention over all Q + L positions (queries and instruction see each other)
         cross-attention to the image, query positions only       (every cross_attention_frequency-th layer)
         feed-forward: intermediate_query/output_query on the queries, intermediate/output on the text
    -> hidden (B, Q + L, D); InstructBLIP keeps the first Q rows for the language model

Quirks of the reference, copied on purpose:
- Query tokens get no position embedding: positions 0..L-1 belong to the text, and the query
  embeddings are concatenated *before* them, then the concatenation goes through the embedding
  LayerNorm (named `layernorm` here, not BERT's `LayerNorm`) and dropout. No token-type embedding.
- Queries and text share the self-attention weights but not the feed-forward: two sets,
  selected by position. Text positions never cross-attend to the image.
- Layer i has `crossattention` iff i % cross_attention_frequency == 0 (layers 0, 2, 4, ... in
  the released checkpoints); its key/value read image features of width encoder_hidden_size.
- HF's position_ids buffer is non-persistent (absent from checkpoints); we use torch.arange, so
  this module has no buffers at all.
- Interface difference: HF's Q-Former takes the mask over all Q + L positions, built by the
  composite model as [ones(Q); instruction mask]; ours takes the instruction's (B, L) mask and
  prepends the ones itself.

Reuse of models/bert.py: the Q-Former is BERT with queries, so its pieces are BERT's:
`BertSelfAttention` for the self-attention and, given `d_context` and a `context`, for the
cross-attention to image features of another width; `BertAddNorm` for the post-LN sublayer ends
(`attention.output`, `crossattention.output`, `output`, `output_query`); BERT's activations.

LoRA targets: module paths read `qformer.encoder.layer.{i}.attention.attention.query` (self) and
`qformer.encoder.layer.{i}.crossattention.attention.key` (cross), so `qformer.*\.(query|key|value)`
selects exactly the 6 projections per cross-attention layer and 3 per other layer. Without the
`\.`, `qformer.*(query|key|value)` also matches `intermediate_query` and `output_query`, which
are not Linear layers, and lora injection rejects them.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.bert import ACTIVATIONS, BertAddNorm, BertSelfAttention


@dataclass(frozen=True)
class QFormerConfig:
    # Defaults are transformers' InstructBlipQFormerConfig's: BERT-base plus cross-attention.
    vocab_size: int = 30522  # bert-base-uncased's WordPiece vocabulary (InstructBLIP adds [DEC]: 30523)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1  # after the embeddings and each sublayer's dense (BertAddNorm)
    attention_probs_dropout_prob: float = 0.1  # on the attention weights, self and cross
    max_position_embeddings: int = 512  # the longest instruction, in tokens
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0  # nn.Embedding padding_idx: that row never receives a gradient
    cross_attention_frequency: int = 2  # layer i reads the image iff i % frequency == 0
    encoder_hidden_size: int = 1408  # width of the image features: the vision model's hidden_size

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")

    @classmethod
    def from_hf(cls, cfg: dict) -> "QFormerConfig":
        """Read a config.json: InstructBLIP's (fields under `qformer_config`) or a bare Q-Former
        config; a missing field takes transformers' default."""
        model_type = cfg.get("model_type")
        if model_type == "instructblip":
            qformer = dict(cfg.get("qformer_config") or {})
            # InstructBlipConfig overwrites this field with the vision width on load; so do we.
            qformer["encoder_hidden_size"] = (cfg.get("vision_config") or {}).get("hidden_size", 1408)
        elif model_type == "instructblip_qformer":
            qformer = cfg
        else:
            raise ValueError(
                f"config.json has model_type {model_type!r}; the Q-Former reads only 'instructblip' "
                "(fields under qformer_config) or 'instructblip_qformer'"
            )
        return cls(**{f.name: qformer[f.name] for f in fields(cls) if f.name in qformer})


class QFormerEmbeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = cfg.hidden_dropout_prob

    def forward(self, query_embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        if L > self.position_embeddings.num_embeddings:
            limit = self.position_embeddings.num_embeddings
            raise ValueError(f"{L} instruction tokens exceed max_position_embeddings={limit}; truncate the instruction")
        positions = torch.arange(L, device=input_ids.device)  # (L,): the text's positions; queries have none
        text = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, L, D)
        x = torch.cat([query_embeds, text], dim=1)  # (B, Q, D) ; (B, L, D) -> (B, Q + L, D)
        # HF keeps query_tokens in fp32 and casts here, so a bf16 Q-Former takes fp32 queries
        x = x.to(self.layernorm.weight.dtype)
        return F.dropout(self.layernorm(x), self.dropout, self.training)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        # BertAddNorm reads hidden_size, layer_norm_eps and hidden_dropout_prob, which QFormerConfig
        # names as BertConfig does. The ModuleDicts reproduce the checkpoint's nesting.
        self.attention = nn.ModuleDict(dict(attention=BertSelfAttention(cfg),
                                            output=BertAddNorm(cfg.hidden_size, cfg)))
        self.crossattention = None
        if has_cross_attention:
            self.crossattention = nn.ModuleDict(dict(
                attention=BertSelfAttention(cfg, d_context=cfg.encoder_hidden_size),
                output=BertAddNorm(cfg.hidden_size, cfg)))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden_size, cfg.intermediate_size)))
        self.output = BertAddNorm(cfg.intermediate_size, cfg)
        self.intermediate_query = nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden_size, cfg.intermediate_size)))
        self.output_query = BertAddNorm(cfg.intermediate_size, cfg)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, attend: torch.Tensor, image_embeds: torch.Tensor,
                image_attend: torch.Tensor | None, n_queries: int) -> torch.Tensor:
        x = self.attention.output(self.attention.attention(x, attend), x)  # (B, Q + L, D)
        queries, text = x[:, :n_queries], x[:, n_queries:]  # (B, Q, D), (B, L, D)
        if self.crossattention is not None:
            attended = self.crossattention.attention(queries, image_attend, context=image_embeds)
            queries = self.crossattention.output(attended, queries)
        queries = self.output_query(self.act(self.intermediate_query.dense(queries)), queries)
        text = self.output(self.act(self.intermediate.dense(text)), text)
        return torch.cat([queries, text], dim=1)  # (B, Q, D) ; (B, L, D) -> (B, Q + L, D)


class QFormerModel(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = QFormerEmbeddings(cfg)
        layers = nn.ModuleList(QFormerLayer(cfg, has_cross_attention=i % cfg.cross_attention_frequency == 0)
                               for i in range(cfg.num_hidden_layers))
        self.encoder = nn.ModuleDict(dict(layer=layers))  # encoder.layer.{i}, as in the checkpoint
        self.gradient_checkpointing = False  # train.py --grad-checkpointing

    def forward(
        self,
        query_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor,
        image_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query_embeds (B, Q, D), input_ids (B, L) long, attention_mask (B, L) with 1 on real
        instruction tokens (None: all real), image_embeds (B, N, encoder_hidden_size),
        image_attention_mask (B, N) or None (InstructBLIP: every patch is real) -> hidden (B, Q + L, D).
        The first Q rows are the query outputs InstructBLIP projects into the language model."""
        B, Q = query_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embeddings(query_embeds, input_ids)  # (B, Q + L, D)
        # Queries are never padding: [ones(Q); instruction mask], as InstructBLIP builds it.
        # A key padding mask, (B, Q + L) -> (B, 1, 1, Q + L), broadcast over heads and query
        # positions; pad rows of the text still run (attending to the real keys), as in HF.
        keep = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=x.device), attention_mask.bool()], dim=1)
        attend = keep[:, None, None, :]
        image_attend = None
        if image_attention_mask is not None:
            image_attend = image_attention_mask.bool()[:, None, None, :]  # (B, N) -> (B, 1, 1, N)
        for layer in self.encoder.layer:
            # not `self.training`: a frozen tower runs in eval mode yet may carry the gradient to LoRA before it
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # keep only each block's input; recompute its insides in backward (less memory)
                x = checkpoint(layer, x, attend, image_embeds, image_attend, Q, use_reentrant=False)
            else:
                x = layer(x, attend, image_embeds, image_attend, Q)
        return x
