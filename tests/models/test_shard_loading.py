"""models/shard_loading.py: a sharded checkpoint adopted one shard at a time equals the whole-dict load,
Linear layers can be swapped as their weights arrive (their bias following from any shard), and the
missing, unexpected and mis-shaped keys are named as load_into names them."""

from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from models.checkpoint import Checkpoint, load_into
from models.llama import LlamaConfig, LlamaForCausalLM
from models.shard_loading import load_streaming

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attention_bias=True)


@pytest.fixture
def sharded(tmp_path):
    reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY))  # q/k/v carry biases
    reference.save_pretrained(tmp_path / "saved", max_shard_size="20KB")
    checkpoint = Checkpoint.open(tmp_path / "saved")
    assert len(set(checkpoint.weight_map.values())) > 3, "the test needs many shards"
    return checkpoint


def meta_model(checkpoint):
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig.from_hf(checkpoint.config))


def test_shard_by_shard_equals_the_whole_dict(sharded):
    whole = load_into(meta_model(sharded), sharded.load_prefix(""), "whole")
    streamed = load_streaming(meta_model(sharded), sharded.iter_prefix(""), "streamed")
    ours, theirs = streamed.state_dict(), whole.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(p.requires_grad for p in streamed.parameters())  # as the module built them


def test_groups_of_a_few_bytes_hold_every_tensor_once_and_load_the_same(sharded):
    """iter_prefix(group_bytes=...) cuts each shard into groups (each read through its own opening of the
    file): together they hold exactly load_prefix's tensors, and streaming them loads the same model."""
    groups = list(sharded.iter_prefix("", group_bytes=4096))
    assert len(groups) > len(set(sharded.weight_map.values()))  # shards really were cut
    keys = [key for group in groups for key in group]
    whole = sharded.load_prefix("")
    assert sorted(keys) == sorted(whole) and len(keys) == len(set(keys))
    assert all(torch.equal(group[k], whole[k]) for group in groups for k in group)
    streamed = load_streaming(meta_model(sharded), sharded.iter_prefix("", group_bytes=4096), "streamed")
    assert all(torch.equal(streamed.state_dict()[k], v) for k, v in whole.items())


class Recorded(nn.Module):
    """A stand-in for a quantized Linear: keeps the weight it was given and the meta Linear's bias slot."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("kept", weight.clone())
        self.bias = linear.bias


def test_linears_are_replaced_as_their_weights_arrive_and_their_biases_follow(sharded):
    calls = []

    def replace(path, linear, weight):
        calls.append(path)
        return Recorded(linear, weight) if path.endswith(("q_proj", "o_proj")) else None

    model = load_streaming(meta_model(sharded), sharded.iter_prefix(""), "streamed", replace=replace)
    reference = load_into(meta_model(sharded), sharded.load_prefix(""), "whole")
    linears = [name for name, m in reference.named_modules() if type(m) is nn.Linear]
    assert sorted(calls) == sorted(linears)  # every Linear offered once, lm_head included
    for layer in range(2):
        q, ref = model.model.layers[layer].self_attn.q_proj, reference.model.layers[layer].self_attn.q_proj
        assert isinstance(q, Recorded) and torch.equal(q.kept, ref.weight) and torch.equal(q.bias, ref.bias)
        assert type(model.model.layers[layer].self_attn.k_proj) is nn.Linear  # not chosen: loaded as is


def test_missing_unexpected_and_mis_shaped_keys_are_named(sharded):
    state = sharded.load_prefix("")
    state["model.extra.weight"] = torch.zeros(2)
    state["model.norm.weight"] = torch.zeros(3)
    del state["lm_head.weight"]
    with pytest.raises(ValueError) as error:
        load_streaming(meta_model(sharded), [state], "tiny [*]")
    message = str(error.value)
    assert "cannot load tiny [*] into LlamaForCausalLM" in message
    assert "missing keys (1): lm_head.weight" in message
    assert "unexpected keys (1): model.extra.weight" in message
    assert "model.norm.weight (module (32,), checkpoint (3,))" in message


QUANTIZED_LOAD = """
import sys, torch
from torch import nn
from safetensors.torch import save_file
from models.checkpoint import Checkpoint
from models.shard_loading import Quantize, load_weights

def rss_file():  # kB of file-backed pages this process maps
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssFile"))

with torch.device("meta"):
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])
state = {f"{i}.{n}": torch.randn(1024, 1024).bfloat16() if n == "weight" else torch.zeros(1024).bfloat16()
         for i in range(8) for n in ("weight", "bias")}
save_file(state, sys.argv[1] + "/model.safetensors")
open(sys.argv[1] + "/config.json", "w").write("{}")
del state
load_weights(model, Checkpoint.open(sys.argv[1]), "", torch.bfloat16, Quantize())  # the first also maps code it needs
with torch.device("meta"):
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])
before = rss_file()
load_weights(model, Checkpoint.open(sys.argv[1]), "", torch.bfloat16, Quantize())
print(rss_file() - before)
"""


def test_a_quantized_load_lets_go_of_the_mapped_file(tmp_path):
    """Streamed with quantization, a checkpoint's 16 MB of bf16 weights become NF4 and the file's mapped pages
    are let go: the biases adopted beside them are copies, not views that would keep each group's mapping
    (every page it touched) resident. In a fresh process, so other tests' mappings do not count."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", QUANTIZED_LOAD, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    kept_kb = int(out.stdout.split()[-1])
    assert kept_kb < 4 * 1024, f"{kept_kb} kB of the 16 MB checkpoint's pages are still mapped after loading"
