"""T5 encoder-decoder with its LM head: InstructBLIP's frozen language model (flan-t5-xl, ...).

Paper: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (JMLR); flan-t5 is Chung et al. 2022, "Scaling Instruction-Finetuned Language Models",
on the T5 v1.1 layout. Ported by hand from transformers v5 `T5ForConditionalGeneration`
(models/t5/modeling_t5.py, itself from Mesh TensorFlow), training and greedy decoding only.

    inputs_embeds (B, S, D)  InstructBLIP: query embeddings, then the prompt's token embeddings
    -> encoder: num_layers x [self-attention, MLP], pre-norm    -> memory (B, S, D)
    decoder_input_ids (B, T) -> shared -> num_decoder_layers x [causal self-attention,
       cross-attention to memory, MLP] -> (x d_model**-0.5 if scaled) -> lm_head -> logits (B, T, V)

Quirks of the reference, copied on purpose:
- T5LayerNorm is RMSNorm: no mean subtraction, no bias; the mean square is taken in fp32 and the
  result cast back to the weight's dtype only when that is fp16/bf16.
- Attention has no bias anywhere and no 1/sqrt(d_kv) scaling (Mesh TF folded it into the init of
  `q`), hence scale=1.0. Positions are not embedded: each stack's first self-attention owns a
  (num_buckets, heads) table of relative position biases, computed once per forward and added to
  the scores of every layer of that stack. Buckets are bidirectional in the encoder and causal
  in the decoder; cross-attention gets no position bias.
- The MLP is ReLU in T5 v1.0 and gated GELU in v1.1/flan (`gelu_new`, the tanh approximation):
  wo(gelu(wi_0 x) * wi_1 x). Its input is cast to `wo`'s dtype: loading in fp16, transformers keeps
  `wo` in fp32 (`_keep_in_fp32_modules`, against fp16 overflow in T5 v1.1/flan), and `load_t5` too.
- In fp16 the residual stream is clamped after every sublayer (the reference's guard against inf).
  With `wo` in fp32 the residual becomes fp32 at the first MLP (fp16 + fp32 promotes), so in
  practice only the first block's attention is clamped; each norm casts back to fp16.
- T5 v1.0 ties lm_head to the input embedding `shared` and multiplies the decoder output by
  d_model**-0.5 first; v1.1/flan has its own lm_head and no scaling (`scale_decoder_outputs`).

Tied weights and checkpoint keys. HF's state_dict also lists `encoder.embed_tokens.weight`,
`decoder.embed_tokens.weight` (always `shared`) and, when tied, `lm_head.weight`; save_pretrained
writes each shared tensor once, so a saved file holds `shared.weight` and, only when untied,
`lm_head.weight`. This module registers no alias at all: both stacks read `self.shared`, and a
tied model has `lm_head = None` and multiplies by `shared.weight`. Its state_dict is exactly a
saved file's keys, `load_state_dict(assign=True)` has no tie to break, and no tie_weights() is
needed. transformers 5 writes tie_word_embeddings=true into every T5 config.json (it unties at load
when the file holds a distinct lm_head.weight), so `load_t5` decides from the file's keys.
"""

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.checkpoint import Checkpoint, load_into, resolve_dtype

ACTIVATIONS = {
    "relu": F.relu,  # T5 v1.0
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # v1.1 / flan ("gated-gelu")
    "gelu": F.gelu,  # exact erf GELU
    "silu": F.silu,  # "gated-silu"
}
# Keys some checkpoints hold that have no place here (transformers drops them as well): copies of
# `shared` written by older savers, and a cross-attention position table that was never used.
ALIASES_OF_SHARED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
UNUSED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


@dataclass(frozen=True)
class T5Config:
    # Defaults are transformers' T5Config (t5-small); flan-t5-xl: d_model 2048, d_ff 5120, 24 + 24 layers, 32 heads
    vocab_size: int = 32128
    d_model: int = 512  # width of the residual stream
    d_kv: int = 64  # per-head width; heads * d_kv need not equal d_model (t5-11b)
    d_ff: int = 2048  # MLP hidden width
    num_layers: int = 6  # encoder blocks
    num_decoder_layers: int = 6  # HF defaults it to num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32  # rows of the relative position table
    relative_attention_max_distance: int = 128  # offsets beyond this share the last bucket
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.1  # embeddings, attention weights, MLP hidden, every sublayer output
    dense_act_fn: str = "relu"
    is_gated_act: bool = False  # wo(act(wi_0 x) * wi_1 x) instead of wo(act(wi x))
    tie_word_embeddings: bool = True  # lm_head is `shared` (see the module docstring)
    scale_decoder_outputs: bool = True  # decoder output x d_model**-0.5 before lm_head (T5 v1.0)
    decoder_start_token_id: int = 0  # T5 starts decoding from the pad token
    eos_token_id: int | tuple[int, ...] | None = 1  # None: generate never stops early
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, cfg: dict) -> "T5Config":
        """Read a T5 config.json, or InstructBLIP's `text_config`; absent fields take HF's defaults."""
        if cfg.get("model_type") != "t5":
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not T5: models/t5.py reads model_type 't5' only")
        # "gated-gelu" -> gated, gelu_new; "relu" -> relu. A config saved by transformers also holds the
        # parsed dense_act_fn / is_gated_act, and those win when present, as they do in transformers.
        proj = cfg.get("feed_forward_proj", "relu").split("-")
        act = cfg.get("dense_act_fn", "gelu_new" if proj == ["gated", "gelu"] else proj[-1])
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} (feed_forward_proj {cfg.get('feed_forward_proj')!r}) "
                             f"is not supported; use one of {sorted(ACTIVATIONS)}")
        tie = cfg.get("tie_word_embeddings", True) is not False
        eos = cfg.get("eos_token_id", 1)
        given = {f.name: cfg[f.name] for f in fields(cls) if cfg.get(f.name) is not None}  # null = HF default
        return cls(**{
            **given,
            "num_decoder_layers": cfg.get("num_decoder_layers") or given.get("num_layers", cls.num_layers),
            "dense_act_fn": act,
            "is_gated_act": cfg.get("is_gated_act", proj[0] == "gated"),
            "tie_word_embeddings": tie,
            # transformers 4 scaled exactly when tied; 5 stores the choice, as it writes tie=true always
            "scale_decoder_outputs": cfg.get("scale_decoder_outputs", tie),
            "eos_token_id": tuple(eos) if isinstance(eos, list) else eos,  # a list is not hashable
        })


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """The reference's guard after each sublayer: fp16 activations of large T5s overflow; clamp to
    just below the largest fp16 when anything already is inf (else to the largest: a no-op)."""
    if x.dtype != torch.float16:
        return x
    limit = torch.where(torch.isinf(x).any(), torch.finfo(x.dtype).max - 1000, torch.finfo(x.dtype).max)
    return x.clamp(-limit, limit)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Mesh TF's bucketing of (key position - query position): exact buckets for small offsets,
    log-spaced ones up to max_distance, one bucket for everything farther. Bidirectional (encoder)
    spends half the buckets on keys after the query; causal (decoder) clips future offsets to 0."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).long() * num_buckets  # keys to the right use the upper half
        distance = relative_position.abs()
    else:
        distance = -relative_position.clamp(max=0)  # only the past counts; the causal mask hides the rest
    max_exact = num_buckets // 2
    # .to(long) truncates toward zero, as the reference; log(0) = -inf is discarded by the where below
    log_bucket = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).to(torch.long)
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


class T5LayerNorm(nn.Module):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight; no mean subtraction, no bias."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)  # in fp32: half-precision squares overflow
        x = x * torch.rsqrt(variance + self.eps)  # promoted to fp32
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)  # the reference casts back only for half weights
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.n_heads, self.d_kv, self.dropout = cfg.num_heads, cfg.d_kv, cfg.dropout_rate
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:  # only in the first block of each stack; the others reuse its bias
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
            self.buckets = (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)

    def position_bias(self, q_len: int, k_len: int, bidirectional: bool, offset: int = 0) -> torch.Tensor:
        """(1, H, q_len, k_len) bias for queries at positions offset.. and keys at 0..k_len-1."""
        device = self.relative_attention_bias.weight.device
        query_position = torch.arange(q_len, device=device)[:, None] + offset  # (q, 1)
        key_position = torch.arange(k_len, device=device)[None, :]  # (1, k)
        buckets = relative_position_bucket(key_position - query_position, bidirectional, *self.buckets)  # (q, k)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (q, k, H) -> (1, H, q, k)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.d_kv).transpose(1, 2)  # (B, L, H*dk) -> (B, H, L, dk)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.k(x)), self.split_heads(self.v(x))  # 2 x (B, H, S, dk)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.split_heads(self.q(x))  # (B, H, L, dk)
        # bias: position bias and masks in one float tensor; scale=1.0 is T5's unscaled dot product
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=1.0,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))  # (B, H, L, dk) -> (B, L, H*dk)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = cfg.dropout_rate

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, cache: dict | None = None) -> torch.Tensor:
        h = self.layer_norm(x)
        keys, values = self.SelfAttention.keys_values(h)
        if cache is not None:  # decoding step by step: the new positions attend to all earlier ones too
            if cache:
                keys, values = torch.cat([cache["keys"], keys], 2), torch.cat([cache["values"], values], 2)
            cache.update(keys=keys, values=values)
        return x + F.dropout(self.SelfAttention(h, keys, values, bias), self.dropout, self.training)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = cfg.dropout_rate

    def forward(self, x: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor | None,
                cache: dict | None = None) -> torch.Tensor:
        if cache:  # the encoder output does not change while decoding: project it once
            keys, values = cache["keys"], cache["values"]
        else:
            keys, values = self.EncDecAttention.keys_values(memory)  # memory is not normalised here
            if cache is not None:
                cache.update(keys=keys, values=values)
        y = self.EncDecAttention(self.layer_norm(x), keys, values, bias)
        return x + F.dropout(y, self.dropout, self.training)


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        inputs = ("wi_0", "wi_1") if cfg.is_gated_act else ("wi",)  # gate (activated) and linear half
        mlp = {name: nn.Linear(cfg.d_model, cfg.d_ff, bias=False) for name in inputs}
        mlp["wo"] = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.DenseReluDense = nn.ModuleDict(mlp)  # the checkpoint's name, "Relu" even when it is GELU
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.act, self.gated, self.dropout = ACTIVATIONS[cfg.dense_act_fn], cfg.is_gated_act, cfg.dropout_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp, h = self.DenseReluDense, self.layer_norm(x)
        h = self.act(mlp.wi_0(h)) * mlp.wi_1(h) if self.gated else self.act(mlp.wi(h))  # (B, L, d_ff)
        h = F.dropout(h, self.dropout, self.training).to(mlp.wo.weight.dtype)  # wo may be kept in fp32
        return x + F.dropout(mlp.wo(h), self.dropout, self.training)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, is_decoder: bool, has_relative_attention_bias: bool):
        super().__init__()
        sublayers = [T5LayerSelfAttention(cfg, has_relative_attention_bias)]
        sublayers += [T5LayerCrossAttention(cfg)] if is_decoder else []
        self.layer = nn.ModuleList(sublayers + [T5LayerFF(cfg)])  # layer.{0,1,2}, as in the checkpoint

    def forward(self, x, self_bias, memory=None, cross_bias=None, cache: dict | None = None) -> torch.Tensor:
        x = clamp_fp16(self.layer[0](x, self_bias, None if cache is None else cache["self"]))
        if memory is not None:
            x = clamp_fp16(self.layer[1](x, memory, cross_bias, None if cache is None else cache["cross"]))
        return clamp_fp16(self.layer[-1](x))


class T5Stack(nn.Module):
    """`encoder` or `decoder`: blocks and a final norm. Embedding and position bias come from outside."""

    def __init__(self, cfg: T5Config, n_layers: int, is_decoder: bool):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, is_decoder, i == 0) for i in range(n_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = cfg.dropout_rate
        self.gradient_checkpointing = False  # train.py --grad-checkpointing

    def forward(self, x, self_bias, memory=None, cross_bias=None, cache: list[dict] | None = None) -> torch.Tensor:
        x = F.dropout(x, self.dropout, self.training)
        for i, block in enumerate(self.block):
            # not `self.training`: a frozen tower runs in eval mode yet may carry the gradient to LoRA before it
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, self_bias, memory, cross_bias, use_reentrant=False)  # recompute in backward
            else:
                x = block(x, self_bias, memory, cross_bias, None if cache is None else cache[i])
        return F.dropout(self.final_layer_norm(x), self.dropout, self.training)


@dataclass
class Seq2SeqLMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # mean cross entropy over labels != -100

    def __getitem__(self, key: str):  # out["logits"], as with transformers' outputs
        return getattr(self, key)


def key_mask_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, S) with 1 on real tokens -> (B, 1, 1, S) additive: 0, or the dtype's min on padding."""
    if attention_mask is None:
        return None
    pad = ~attention_mask.bool()[:, None, None, :]  # broadcast over heads and queries
    return torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill(pad, torch.finfo(dtype).min)


class T5ForConditionalGeneration(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # input table of both stacks
        self.encoder = T5Stack(config, config.num_layers, is_decoder=False)
        self.decoder = T5Stack(config, config.num_decoder_layers, is_decoder=True)
        # tied: no module at all, logits use shared.weight (see the module docstring)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        """input_ids (B, S) or inputs_embeds (B, S, D), attention_mask (B, S) 1 = real -> memory (B, S, D)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds to the T5 encoder")
        x = self.shared(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, D)
        S = x.shape[1]
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(S, S, bidirectional=True)  # (1, H, S, S)
        if attention_mask is not None:  # padding keys get the dtype's min in place of their bias
            bias = bias.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(bias.dtype).min)
        return self.encoder(x, bias)  # pad queries get (meaningless) rows too, as in the reference

    def decode(self, decoder_input_ids, memory, cross_bias, cache: list[dict] | None = None, start: int = 0):
        """decoder_input_ids (B, T) at positions start.., memory (B, S, D) -> hidden (B, T, D).
        With a cache, keys and values of positions < start are read from it and the new ones added."""
        x = self.shared(decoder_input_ids)  # (B, T, D)
        T = x.shape[1]
        bias = self.decoder.block[0].layer[0].SelfAttention.position_bias(T, start + T, bidirectional=False,
                                                                          offset=start)
        query_position = torch.arange(T, device=x.device)[:, None] + start  # (T, 1)
        future = torch.arange(start + T, device=x.device)[None, :] > query_position  # (T, start + T)
        bias = bias.masked_fill(future, torch.finfo(bias.dtype).min)  # (1, H, T, start + T)
        return self.decoder(x, bias, memory, cross_bias, cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.scale_decoder_outputs:  # T5 v1.0: the tied table is shared with the input side
            hidden = hidden * self.config.d_model**-0.5
        weight = self.shared.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)  # (B, T, D) -> (B, T, V)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: decoder inputs are the labels delayed by one, after the start token;
        -100 (ignored label) is not a token, so it becomes pad. HF's `_shift_right`."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)  # (B, T)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                labels=None) -> Seq2SeqLMOutput:
        """Encoder input as in `encode`; decoder_input_ids (B, T) or labels (B, T) (then shifted right)."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass labels (the decoder input is then labels shifted right) or decoder_input_ids")
            decoder_input_ids = self.shift_right(labels)
        memory = self.encode(input_ids, attention_mask, inputs_embeds)  # (B, S, D)
        hidden = self.decode(decoder_input_ids, memory, key_mask_bias(attention_mask, memory.dtype))
        logits = self.logits(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            # fp32 loss: the reference uses the logits' dtype, identical in fp32 and coarser in bf16
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None,
                 max_new_tokens: int = 20) -> torch.Tensor:
        """Greedy decoding with a KV cache -> (B, 1 + n) long: decoder_start_token_id, then n <= max_new_tokens
        tokens. A row that emits eos keeps it and is padded with pad_token_id after it; decoding stops when
        every row has, as `transformers` generate(do_sample=False, num_beams=1). Unlike transformers, a
        missing attention_mask is not inferred from pad tokens in input_ids: everything is attended."""
        memory = self.encode(input_ids, attention_mask, inputs_embeds)  # (B, S, D)
        cross_bias = key_mask_bias(attention_mask, memory.dtype)
        cache = [dict(self={}, cross={}) for _ in self.decoder.block]
        tokens = torch.full((memory.shape[0], 1), self.config.decoder_start_token_id, device=memory.device)
        eos_ids = self.config.eos_token_id
        eos = torch.tensor([] if eos_ids is None else eos_ids, dtype=torch.long, device=memory.device).flatten()
        finished = torch.zeros(memory.shape[0], dtype=torch.bool, device=memory.device)
        for step in range(max_new_tokens):
            hidden = self.decode(tokens[:, -1:], memory, cross_bias, cache, start=step)  # (B, 1, D): one new position
            next_token = self.logits(hidden[:, -1]).argmax(-1)  # (B,)
            next_token = next_token.masked_fill(finished, self.config.pad_token_id)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            finished |= torch.isin(next_token, eos)
            if finished.all():
                break
        return tokens


def load_t5(checkpoint: Checkpoint | str, prefix: str = "", config: dict | None = None,
            dtype: str | torch.dtype | None = None) -> T5ForConditionalGeneration:
    """T5ForConditionalGeneration from the keys under `prefix` of a checkpoint (or its directory or hub id), in
    eval mode. config: the T5 config dict (default: config.json; InstructBLIP: its `text_config`, with prefix
    'language_model.'). dtype: cast floating tensors (default: keep the file's)."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint.open(checkpoint)
    state = checkpoint.load_prefix(prefix)
    source = f"{checkpoint.source} [{prefix or '(no prefix)'}*]"
    for key in ALIASES_OF_SHARED:
        alias = state.pop(key, None)
        if alias is None:
            continue
        shared = state.setdefault("shared.weight", alias)  # a deduplicating saver may have kept only the alias
        if not torch.equal(alias, shared):
            raise ValueError(f"{source}: {key} differs from shared.weight; this port has one input table for both")
    for key in UNUSED_KEYS:
        state.pop(key, None)
    dtype = resolve_dtype(dtype) if dtype is not None else None
    for key, tensor in state.items():
        if dtype is not None and tensor.is_floating_point():
            # transformers' _keep_in_fp32_modules: `wo` stays fp32 when the model is loaded in fp16
            keep = dtype == torch.float16 and key.endswith("DenseReluDense.wo.weight")
            state[key] = tensor.to(torch.float32 if keep else dtype)
    cfg = T5Config.from_hf(checkpoint.config if config is None else config)
    cfg = replace(cfg, tie_word_embeddings="lm_head.weight" not in state)  # the file decides, see the docstring
    with torch.device("meta"):
        model = T5ForConditionalGeneration(cfg)
    return load_into(model, state, source).eval()
