"""BERT text encoder: the encoder path of `transformers.BertModel`, for the text tower.

Paper: Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding" (NAACL). Ported from transformers v5 `models/bert/modeling_bert.py`
(BertEmbeddings, BertSelfAttention, BertSelfOutput, BertIntermediate, BertOutput, BertPooler),
the encoder path only: no cross-attention, no KV cache, no MLM/NSP heads. Any checkpoint with
model_type "bert" runs here: bert-base-uncased, sentence-transformers/all-MiniLM-L6-v2, ...

Quirks of the reference that we copy on purpose:
- post-LN: every sublayer ends in `LayerNorm(residual + dropout(dense(x)))`, the original
  Transformer's order (GPT-2 and Whisper normalise before the sublayer instead), and there is
  no final LayerNorm after the last layer;
- LayerNorm eps is 1e-12 (the TensorFlow original's), not PyTorch's 1e-5: read from the config;
- the token-type (segment) embedding is added even to a single sentence: type 0 everywhere;
- "gelu" is the exact erf GELU; "gelu_new" is GPT-2's tanh approximation;
- the pooler, tanh(dense(hidden at [CLS])), was trained for next-sentence prediction. Sentence
  embedding models ignore it and mean-pool (`mean_pool`), but most checkpoints carry its weights,
  so it is built when the checkpoint has it (`with_pooler`, see `has_pooler`) and loads strictly.

Buffers: HF's BertEmbeddings holds `position_ids` and `token_type_ids` buffers. They have been
non-persistent since transformers 4.31, so they are absent from its state_dict and from the
safetensors it writes; checkpoints saved earlier still hold `embeddings.position_ids` (an arange,
harmless to drop). This port has no buffers at all: positions are `torch.arange(L)` in forward, so
a model built on the meta device and loaded with `assign=True` has nothing left to rebuild.
"""

import functools
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import nn

ACTIVATIONS = {
    "gelu": F.gelu,  # exact: x * Phi(x), BERT's original
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),  # the tanh approximation (GPT-2)
    "relu": F.relu,
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522  # WordPiece vocabulary of bert-base-uncased
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # head dim = hidden_size / num_attention_heads
    intermediate_size: int = 3072  # MLP width, 4 x hidden in the paper's models
    max_position_embeddings: int = 512  # learned absolute positions: the longest input
    type_vocab_size: int = 2  # segments A and B of the next-sentence task
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int | None = 0  # nn.Embedding padding_idx: that row never receives a gradient
    hidden_dropout_prob: float = 0.1  # after the embeddings and after each sublayer's dense
    attention_probs_dropout_prob: float = 0.1  # on the attention weights

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertConfig":
        """Read a checkpoint's config.json; a missing field takes transformers' BertConfig default."""
        if cfg.get("model_type") != "bert":
            raise ValueError(
                f"model_type {cfg.get('model_type')!r} is not a BERT checkpoint: "
                "models/bert.py reads model_type 'bert' only"
            )
        # Relative position variants existed in transformers 4 (position_embedding_type); v5 and
        # this port know only the learned absolute table, so refuse rather than compute garbage.
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {cfg['position_embedding_type']!r} is not supported, "
                             "only 'absolute'")
        defaults = cls()
        return cls(**{f.name: cfg.get(f.name, getattr(defaults, f.name)) for f in fields(cls)})


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = cfg.hidden_dropout_prob

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        if L > self.position_embeddings.num_embeddings:
            # otherwise the position lookup fails with an anonymous "index out of range"
            limit = self.position_embeddings.num_embeddings
            raise ValueError(f"{L} tokens exceed max_position_embeddings={limit}; "
                             "truncate in the tokenizer (max_length)")
        positions = torch.arange(L, device=input_ids.device)  # (L,), broadcast over the batch
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, L, H)
        x = x + self.position_embeddings(positions)
        return F.dropout(self.LayerNorm(x), self.dropout, self.training)


class BertSelfAttention(nn.Module):
    """`attention.self`: multi-head scaled dot-product attention, without its output projection.

    Keys and values come from `x` itself, or from a `context` of width `d_context` when the
    module is a cross-attention (the Q-Former's queries attending to image features)."""

    def __init__(self, cfg: BertConfig, d_context: int | None = None):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        # all three projections have a bias (Whisper's key projection does not)
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(d_context or cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(d_context or cfg.hidden_size, cfg.hidden_size)
        self.dropout = cfg.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, L, H = x.shape
        S = context.shape[1]
        # (B, L, H) -> (B, L, nh, H/nh) -> (B, nh, L, H/nh); key and value likewise with S positions
        q = self.query(x).view(B, L, self.n_head, H // self.n_head).transpose(1, 2)
        k = self.key(context).view(B, S, self.n_head, H // self.n_head).transpose(1, 2)
        v = self.value(context).view(B, S, self.n_head, H // self.n_head).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)  # (B, nh, L, H/nh)
        return y.transpose(1, 2).reshape(B, L, H)  # (B, nh, L, H/nh) -> (B, L, H)


class BertAddNorm(nn.Module):
    """`attention.output` and `output`: BERT's post-LN step, LayerNorm(residual + dropout(dense(x)))."""

    def __init__(self, d_in: int, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = cfg.hidden_dropout_prob

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + F.dropout(self.dense(x), self.dropout, self.training))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        # The ModuleDicts only reproduce the checkpoint's nesting (attention.self.query,
        # intermediate.dense), so that loading stays a strict load_state_dict.
        self.attention = nn.ModuleDict(dict(self=BertSelfAttention(cfg), output=BertAddNorm(cfg.hidden_size, cfg)))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden_size, cfg.intermediate_size)))
        self.output = BertAddNorm(cfg.intermediate_size, cfg)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, attend), x)
        x = self.output(self.act(self.intermediate.dense(x)), x)
        return x


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig, with_pooler: bool = True):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.encoder = nn.ModuleDict(dict(layer=layers))  # encoder.layer.{i}, as in the checkpoint
        # Off the encoding path; it exists so a checkpoint holding pooler.dense loads strictly.
        # HF's BertForMaskedLM is built without it, hence the switch.
        self.pooler = nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden_size, cfg.hidden_size))) if with_pooler else None
        self.gradient_checkpointing = False  # train.py --grad-checkpointing

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, L) long, attention_mask (B, L) with 1 on real tokens -> last hidden (B, L, H)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # one segment, as HF's all-zero buffer
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, H)
        attend = None
        if attention_mask is not None:
            # A key padding mask: (B, L) -> (B, 1, 1, L), broadcast over heads and queries, so no
            # query sees a pad key. Pad queries still get (meaningless) rows; pooling drops them.
            attend = attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            # not `self.training`: a frozen tower runs in eval mode yet may carry the gradient to LoRA before it
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, attend, use_reentrant=False)  # recompute in backward: less memory
            else:
                x = layer(x, attend)
        return x

    def pooler_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """HF's `pooler_output`: tanh(dense(hidden at [CLS])), (B, L, H) -> (B, H)."""
        if self.pooler is None:
            raise ValueError("this BertModel was built with_pooler=False (its checkpoint has no pooler.dense); "
                             "use mean_pool")
        return torch.tanh(self.pooler.dense(hidden[:, 0]))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over real tokens, (B, L, H) -> (B, H): sentence-transformers'
    mean pooling, sum of masked tokens / clamp(count, min=1e-9), so an empty row gives 0, not NaN."""
    mask = attention_mask[:, :, None].to(hidden.dtype)  # (B, L) -> (B, L, 1)
    summed = (hidden * mask).sum(dim=1)  # (B, H)
    # count in fp32: bf16 rounds counts above 256, and fp16 flushes the 1e-9 floor to 0
    count = attention_mask.sum(dim=1, keepdim=True).float().clamp(min=1e-9)  # (B, 1)
    return (summed / count).to(hidden.dtype)


def bert_prefix(keys) -> str:
    """Where a checkpoint keeps the encoder: "bert." (BertForMaskedLM, BertForPreTraining, ...)
    or "" (BertModel, sentence-transformers). Other keys (cls.predictions.*) are not ours to load."""
    keys = set(keys)
    found = [prefix for prefix in ("bert.", "") if f"{prefix}embeddings.word_embeddings.weight" in keys]
    if len(found) != 1:
        top_level = sorted({key.split(".")[0] for key in keys})
        raise ValueError(
            "cannot find the BERT encoder in this checkpoint: expected 'embeddings.word_embeddings.weight' "
            "(BertModel) or 'bert.embeddings.word_embeddings.weight' (BertFor...), "
            f"found {'both' if found else 'neither'}; "
            f"its {len(keys)} keys start with: {', '.join(top_level[:20])}"
        )
    return found[0]


def has_pooler(keys, prefix: str) -> bool:
    """Whether to build BertModel(with_pooler=True) for a checkpoint with these keys."""
    return f"{prefix}pooler.dense.weight" in set(keys)
