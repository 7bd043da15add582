"""Models and helpers shared by the LoRA tests: a hand-written nested model and a tiny HF encoder."""

import copy

import torch
from torch import nn


class TinyAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)  # bias-free like Whisper's key projection
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.out_proj(attn @ v)


class QueryFeedForward(nn.Module):
    """A non-Linear module whose name ends in `query`, as InstructBLIP's `intermediate_query`."""

    def __init__(self, d: int):
        super().__init__()
        self.dense = nn.Linear(d, 2 * d)

    def forward(self, x):
        return torch.relu(self.dense(x))


class TinyBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self_attn = TinyAttention(d)
        self.norm = nn.LayerNorm(d)
        self.intermediate_query = QueryFeedForward(d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.self_attn(self.norm(x))
        return x + self.fc2(self.intermediate_query(x))


class TinyNet(nn.Module):
    """Nested Linear layers at several depths, in a ModuleList, with a root-level parameter."""

    def __init__(self, d_in: int = 6, d: int = 16, d_out: int = 5, n_layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.layers = nn.ModuleList(TinyBlock(d) for _ in range(n_layers))
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d_out))
        self.logit_scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x) * self.logit_scale


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


def tiny_qwen2_audio_encoder(seed: int = 0):
    """transformers.Qwen2AudioEncoder from a tiny random config, and a valid input for it."""
    from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig

    config = Qwen2AudioEncoderConfig(
        num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
        max_source_positions=12
    )
    torch.manual_seed(seed)
    model = Qwen2AudioEncoder(config).eval()
    # The reference insists on exactly 2 * max_source_positions input frames.
    features = torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions,
                           generator=torch.Generator().manual_seed(seed + 1))
    return model, features


def run(model, x):
    """The model's main output tensor, whether it returns a tensor or an HF ModelOutput."""
    out = model(x)
    return out if torch.is_tensor(out) else out.last_hidden_state


def randomize_lora(model, seed: int = 0, scale: float = 0.2):
    """Give every lora_A/lora_B (ours or PEFT's) non-zero values, so the update actually does something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A" in name or ".lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def give_lora_B_values(model, std: float):
    """lora_B starts at zero, so lora_A gets no gradient: draw every lora_B from N(0, std²) (the global RNG),
    so a comparison of gradients covers A too."""
    from lora import lora_layers

    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, std)


def peft_lora_modules(peft_model) -> dict:
    """PEFT's LoRA layers by the dotted path they have in the base model."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def peft_copy(base, ours_config, ours_model=None):
    """A PEFT model over a copy of `base` with our config's settings; copies our A/B into it if given."""
    from peft import LoraConfig, get_peft_model

    patterns = ours_config.patterns
    target = patterns[0] if len(patterns) == 1 else "|".join(f"(?:{p})" for p in patterns)
    peft_config = LoraConfig(
        target_modules=target, r=ours_config.r, lora_alpha=ours_config.alpha, lora_dropout=ours_config.dropout,
        use_rslora=ours_config.rslora
    )
    peft_model = get_peft_model(copy.deepcopy(base), peft_config)
    if ours_model is not None:
        ours_layers = dict(ours_model.named_modules())
        with torch.no_grad():
            for path, layer in peft_lora_modules(peft_model).items():
                layer.lora_A["default"].weight.copy_(ours_layers[path].lora_A.weight)
                layer.lora_B["default"].weight.copy_(ours_layers[path].lora_B.weight)
    return peft_model
