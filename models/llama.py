"""A decoder-only transformer: LLaMA (Vicuna, InstructBLIP-Vicuna's language model) and Qwen2.

Papers: Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models" (arXiv
2302.13971) and "Llama 2" (arXiv 2307.09288); Qwen2 is Yang et al. 2024 (arXiv 2407.10671), the
same architecture with biases on q/k/v. Ported by hand from transformers v5 `LlamaForCausalLM` and
`Qwen2ForCausalLM` (models/llama/modeling_llama.py, models/qwen2/modeling_qwen2.py), laid out like
gpt-fast's model.py: training, scoring and greedy decoding only.

    input_ids (B, T) -> model.embed_tokens, or inputs_embeds (B, T, D) given directly
    -> num_hidden_layers x [x + attn(rmsnorm(x)), x + mlp(rmsnorm(x))]  causal, rotary positions
    -> model.norm -> last_hidden_state (B, T, D) -> lm_head -> logits (B, T, V), computed only if read
    training: the positions whose next label is not -100 (N, D) -> lm_head in chunks, each chunk's
    logits recomputed in backward (models/lm_loss.py) -> mean cross entropy; never (B, T, V)
    gradient_checkpointing: each decoder layer's activations recomputed in backward instead of kept

What differs between the checkpoints is config only (`LlamaConfig.from_hf`): Qwen2 has biases on
q/k/v (not o), a larger rope_theta and sometimes tied embeddings; LLaMA 3.1 scales its rotary
frequencies ("llama3"), some fine-tunes stretch positions ("linear").

Quirks of the reference, copied on purpose:
- RMSNorm squares in fp32 and casts back to the *input's* dtype before the weight multiplies
  (T5's norm casts to the weight's dtype: a different rounding in bf16).
- Rotary embeddings rotate the two *halves* of each head (`rotate_half`), not interleaved pairs as
  in the paper and gpt-fast: the checkpoints' q/k weights were permuted for this layout.
- Positions come from the attention mask (cumsum - 1), as transformers' generate computes them:
  padding anywhere in a row shifts no real token. RoPE cannot see a shift of a whole row (left
  padding), but it sees a gap, and InstructBLIP's [queries; padding; prompt] has one.
- Grouped-query attention: num_key_value_heads < num_attention_heads, each key/value head serves
  heads / kv_heads query heads (Ainslie et al. 2023, arXiv 2305.13245).

Packed rows (data/packing.py): several examples in one row, `segment_ids` (B, T) numbering them 1, 2, ...
in each row (0 = padding) and `position_ids` restarting at 0 for each. Attention is then block-diagonal
causal (`BlockCausal`, models/attention.py): a token sees the earlier tokens of its own example only, so
every example gets exactly the hidden states it gets alone. Greedy decoding and its static KV cache are in
models/generation.py.

Tied weights: when tie_word_embeddings is set, save_pretrained writes only
`model.embed_tokens.weight`; this module then has `lm_head = None` and multiplies by the embedding
table, so its state_dict is exactly the file's keys (as models/t5.py does with `shared`).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import BlockCausal, SharedMask, attend, attention_mask_and_positions, segment_positions
from models.checkpoint import Checkpoint, CheckpointError, resolve_dtype
from models.generation import KVCache, greedy_generate
from models.lm_loss import CHUNK_POSITIONS, next_token_loss
from models.shard_loading import STREAM_GROUP_BYTES, Quantize, load_streaming
from models.swiglu import silu_mul

ROPE_TYPES = ("default", "linear", "llama3")
MODEL_TYPES = ("llama", "qwen2")
# Written by transformers before 4.31 (an arange-derived buffer, not a weight); safe to drop.
LEGACY_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0  # base wavelength; LLaMA 1/2 and Vicuna 1e4, LLaMA 3 5e5, Qwen2 1e6
    type: str = "default"  # "linear": frequencies / factor; "llama3": long wavelengths / factor, smoothed
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only: wavelengths above original / low_freq_factor are scaled
    high_freq_factor: float = 4.0  # llama3 only: wavelengths below original / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3 only: the pre-training context


@dataclass(frozen=True)
class LlamaConfig:
    # Defaults are transformers' LlamaConfig (LLaMA-7B); Vicuna-7B is exactly this with vocab 32001
    vocab_size: int = 32000
    hidden_size: int = 4096  # D, width of the residual stream
    intermediate_size: int = 11008  # SwiGLU hidden width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # < heads: grouped-query attention (Qwen2-7B: 4 for 28 heads)
    head_dim: int = 128  # hidden_size // heads unless the config says otherwise
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False  # LLaMA's attention_bias covers o_proj too; Qwen2 has none there
    mlp_bias: bool = False
    tie_word_embeddings: bool = False  # lm_head is embed_tokens (Qwen2-0.5B/1.5B)
    attention_dropout: float = 0.0
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)  # generation stops at any of these
    pad_token_id: int | None = None  # fills finished rows in generate; None: the first eos, as transformers

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """Read a llama or qwen2 config.json (or InstructBLIP's / Qwen2-Audio's `text_config`)."""
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r}: models/llama.py reads {' and '.join(MODEL_TYPES)} configs")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r}: LLaMA and Qwen2 use SwiGLU with silu; "
                             "nothing else is ported")
        layer_types = cfg.get("layer_types") or []
        if cfg.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise ValueError("this qwen2 config turns on sliding-window attention (use_sliding_window / layer_types); "
                             "only full attention is ported, as every released Qwen2 checkpoint uses")
        # transformers 5 writes rope_parameters; older config.json files have rope_theta and rope_scaling
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not ported; supported: {', '.join(ROPE_TYPES)}")
        if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 (rotary on part of each head) is not ported")
        rope = RopeConfig(
            theta=float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))), type=rope_type,
            factor=float(params.get("factor", 1.0)), low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings",
                                                            cfg.get("max_position_embeddings", 8192))),
        )
        heads = cfg.get("num_attention_heads", 32)
        hidden = cfg.get("hidden_size", 4096)
        bias = cfg.get("attention_bias", False)
        eos = cfg.get("eos_token_id", 2)
        pad = cfg.get("pad_token_id")
        return cls(
            vocab_size=cfg.get("vocab_size", 32000), hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size", 11008),
            num_hidden_layers=cfg.get("num_hidden_layers", 32), num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope=rope,
            qkv_bias=True if model_type == "qwen2" else bias, o_bias=False if model_type == "qwen2" else bias,
            mlp_bias=cfg.get("mlp_bias", False), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_dropout=float(cfg.get("attention_dropout", 0.0)), bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            pad_token_id=None if pad is None or pad < 0 else pad,  # decapoda-era LLaMA configs say -1
        )


def rope_inverse_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """(head_dim / 2,) float32 angular frequencies theta^(-2i/d), rescaled for "linear" / "llama3"."""
    rope, dim = cfg.rope, cfg.head_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.type == "linear":  # positions / factor, folded into the frequencies
        return inv_freq / rope.factor
    if rope.type == "llama3":  # Llama 3.1: slow rotations stretched by factor, fast ones kept, smooth between
        wavelength = 2 * math.pi / inv_freq
        low_wavelength = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelength = rope.original_max_position_embeddings / rope.high_freq_factor
        scaled = torch.where(wavelength > low_wavelength, inv_freq / rope.factor, inv_freq)
        smooth = ((rope.original_max_position_embeddings / wavelength - rope.low_freq_factor)
                  / (rope.high_freq_factor - rope.low_freq_factor))
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        between = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
        return torch.where(between, smoothed, scaled)
    return inv_freq


class RopeTables:
    """cos and sin of every position's rotary angles, computed once (in fp32, as the reference) up to the
    longest position seen, and cast once per (device, dtype): a generation step, a training step and a
    new batch all read rows of the same tables instead of recomputing `positions x inv_freq`.

    A plain attribute, not a buffer: `model.to(torch.bfloat16)` casts buffers, and angles of large
    positions rounded to bf16 before cos/sin would rotate by the wrong amount; here only the finished
    cos/sin are cast, to the dtype the activations have."""

    def __init__(self, cfg: LlamaConfig):
        self.config = cfg  # the frequencies are computed at the first lookup: models are built on the meta device
        self.length = 0
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) long -> (cos, sin), each (B, T, d) in `dtype`."""
        needed = int(positions.max()) + 1 if positions.numel() else 1
        if needed > self.length:  # grow to the next power of two: a generation extends it a few times at most
            self.length, self.tables = 1 << max(needed - 1, 1).bit_length(), {}
        key = (positions.device, dtype)
        if key not in self.tables:
            inv_freq = rope_inverse_frequencies(self.config).to(positions.device)  # (d/2,) fp32
            angles = torch.arange(self.length, device=positions.device).float()[:, None] * inv_freq  # (L, d/2)
            angles = torch.cat([angles, angles], dim=-1)  # (L, d): one angle per half, see rotate_half
            self.tables[key] = angles.cos().to(dtype), angles.sin().to(dtype)
        cos, sin = self.tables[key]
        rows = positions.clamp(min=0)  # a padding position may be negative; its output is never used
        return cos[rows], sin[rows]  # (B, T, d) each


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (x1, x2) -> (-x2, x1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d) rotated by position; cos, sin (B, T, d) broadcast over heads."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019); no mean, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # in fp32: half-precision squares overflow
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)  # back to the input's dtype first, as the reference


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.layer = cfg.head_dim, layer
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, T, H*d) -> (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, d)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H_kv, S, d), S = cached + T
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, T, H*d)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)), the product keeping two activations for backward,
    not autograd's three (models/swiglu.py)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """`model.*` of the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # train.py --grad-checkpointing
        self.rope = RopeTables(cfg)

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                segment_ids=None) -> torch.Tensor:
        """inputs_embeds (B, T, D) -> last hidden state (B, T, D), normed. With `segment_ids` (B, T), packed rows
        (see the module docstring): the attention is block-diagonal causal and attention_mask is not read."""
        B, T, _ = inputs_embeds.shape
        start = 0 if cache is None else cache.length
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) are for training and scoring; generate from unpacked, "
                                 "left-padded prompts")
            if segment_ids.shape != (B, T):
                raise ValueError(f"segment_ids have shape {tuple(segment_ids.shape)}; they must align with the inputs: "
                                 f"({B}, {T})")
            mask = BlockCausal(segment_ids)
            positions = segment_positions(segment_ids) if position_ids is None else position_ids
        else:
            allowed, positions = attention_mask_and_positions(attention_mask, B, start, T, inputs_embeds.device)
            mask = SharedMask(allowed)
            positions = positions if position_ids is None else position_ids
        cos, sin = self.rope.lookup(positions, inputs_embeds.dtype)  # (B, T, d) each
        x = inputs_embeds
        for layer in self.layers:
            # not `self.training`: a frozen LM runs in eval mode yet carries the gradient to LoRA before it
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)  # recompute in backward
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)


@dataclass
class CausalLMOutput:
    """What the decoder-only models return. `logits` (B, T, V) are projected from last_hidden_state when
    first read, not in forward: a training step reads only `.loss` (computed from the labelled positions,
    models/lm_loss.py), so it never holds (B, T, V) floats. Read them under the forward's autocast to get
    the forward's dtype."""
    last_hidden_state: torch.Tensor  # (B, T, D), after the final norm
    head: Callable[[torch.Tensor], torch.Tensor]  # (..., D) -> (..., V): the model's lm_head (or tied embeddings)
    loss: torch.Tensor | None = None  # mean next-token cross entropy over labels != -100
    _logits: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self.head(self.last_hidden_state)  # (B, T, D) -> (B, T, V), once
        return self._logits

    def __getitem__(self, key: str):  # out["logits"], as with transformers' outputs
        return getattr(self, key)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # tied: no module at all, logits use model.embed_tokens.weight (see the module docstring)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        # scored positions projected onto the vocabulary at a time (models/lm_loss.py)
        self.loss_chunk_size = CHUNK_POSITIONS

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V). The lm_head module is called, not its weight read: LoRA on lm_head must act."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None, position_ids=None,
                cache: KVCache | None = None, segment_ids=None) -> CausalLMOutput:
        """input_ids (B, T) or inputs_embeds (B, T, D); attention_mask (B, cached + T), 1 = real token,
        padding on either side; labels (B, T) aligned with the inputs (-100 ignored): logits at t
        are scored against labels at t + 1, as transformers' ForCausalLMLoss. The loss projects only the
        scored positions onto the vocabulary; `.logits` are computed if read (CausalLMOutput).
        Packed rows: segment_ids and position_ids (B, T) from data/packing.py; the label of each example's first
        token must be -100 (the packer writes it so), or the previous example's last token would score it."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        hidden = self.model(x, attention_mask, position_ids, cache, segment_ids)
        loss = None
        if labels is not None:  # fp32 per chunk, as the reference upcasts; the last position predicts nothing
            loss = next_token_loss(hidden, labels, self.logits, self.loss_chunk_size)
        return CausalLMOutput(last_hidden_state=hidden, head=self.logits, loss=loss)

    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens: int = 20,
                 eos_token_id: int | tuple[int, ...] | None = None, use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding -> (B, n) long, the n <= max_new_tokens new tokens only; stops when every row has
        emitted eos. Pad the prompt on the left. See models/generation.py greedy_generate."""
        return greedy_generate(self, input_ids, inputs_embeds, attention_mask, max_new_tokens, eos_token_id,
                               use_cache)


def load_llama(checkpoint: Checkpoint | str, prefix: str = "", config: dict | None = None,
               dtype: str | torch.dtype | None = None, quantize: Quantize | None = None) -> LlamaForCausalLM:
    """LlamaForCausalLM (llama or qwen2) from the keys under `prefix` of a checkpoint (or its directory or hub
    id), in eval mode. config: the LM's config dict (default: config.json; InstructBLIP: its `text_config`
    with prefix 'language_model.'; Qwen2-Audio the same). dtype: cast floating tensors (default: the file's).

    Read shard by shard (models/shard_loading.py): with `quantize`, each Linear weight but lm_head's becomes
    NF4 as its shard is read, so a 7B model never sits in memory in 16 bits. lm_head stays in `dtype`, as
    transformers + bitsandbytes keep it: NF4 would save 0.9 GB of Qwen2-Audio-7B's 1.28 GB bf16 head, at
    the price of rounding every logit of the loss and of generation."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint.open(checkpoint)
    cfg = LlamaConfig.from_hf(checkpoint.config if config is None else config)
    source = f"{checkpoint.source} [{prefix or '(no prefix)'}*]"
    tied_copies = []  # some savers write the tied lm_head.weight anyway: checked against the embeddings below

    def skip(key: str) -> bool:
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            return True
        return key.endswith(LEGACY_SUFFIXES)

    def shards():
        group_bytes = STREAM_GROUP_BYTES if quantize is not None else None  # unquantized, every tensor is kept anyway
        for state in checkpoint.iter_prefix(prefix, resolve_dtype(dtype) if dtype is not None else None, group_bytes):
            if cfg.tie_word_embeddings and "lm_head.weight" in state:
                tied_copies.append(state["lm_head.weight"])
            yield state

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    replace = quantize.keeping("lm_head").replacer() if quantize is not None else None
    load_streaming(model, shards(), source, replace=replace, skip=skip)
    if tied_copies and not torch.equal(tied_copies[0], model.model.embed_tokens.weight):
        raise CheckpointError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from "
                              "model.embed_tokens.weight; fix the config's tie_word_embeddings")
    return model.eval()
