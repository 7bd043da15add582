"""NF4 (lora/quant.py) against bitsandbytes' quantize_4bit/dequantize_4bit, bit for bit, and NF4Linear
against F.linear with the dequantized weight. bitsandbytes is imported unconditionally: without it
these tests fail, they never skip."""

import gc
import weakref

import bitsandbytes.functional as bnb_functional
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora import LoRAConfig, inject_lora
from lora.quant import NF4_CODE, NF4Linear, NF4Tensor, dynamic_map, nf4_bytes, quantize_nf4, replace_with_nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# not multiples of 64, a single block, one value, an odd count, and more than 256 blocks (several nested blocks)
SHAPES = [(3, 70), (1, 64), (130, 257), (1, 1), (5, 13), (300, 300)]


def awkward_weight(shape, dtype, seed=0) -> torch.Tensor:
    """Gaussian weights with exact zeros, a whole block of zeros, tiny values and large but finite extremes."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    flat = w.view(-1)
    flat[torch.rand(flat.shape, generator=gen) < 0.1] = 0.0
    if flat.numel() >= 192:
        flat[64:128] = 0.0  # block 1 all zeros: absmax 0
    big = torch.finfo(dtype).max / 4 if dtype != torch.float32 else 1e30
    flat[-1] = big
    if flat.numel() > 2:
        flat[flat.numel() // 2] = -big
        flat[1] = 1e-7
    return w.to(dtype)


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_CODE), bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nf4_is_bit_identical_to_bitsandbytes(shape, dtype, double_quant):
    weight = awkward_weight(shape, dtype, seed=sum(shape))
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                                 quant_type="nf4")
    ours = quantize_nf4(weight, blocksize=64, double_quant=double_quant)

    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)  # uint8 codes with double quantization, fp32 otherwise
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.offset, state.offset)
    else:
        assert ours.nested_absmax is None and ours.offset is None
    expected = bnb_functional.dequantize_4bit(packed, state)
    dequantized = ours.dequantize()
    assert dequantized.dtype == dtype and dequantized.shape == torch.Size(shape)
    assert torch.equal(dequantized, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantizing_a_slice_of_blocks_at_a_time_is_bit_identical_to_bitsandbytes(monkeypatch, dtype):
    """dequantize() fills its result a few blocks at a time (lora.quant.DEQUANTIZE_BLOCKS): with 3 blocks a
    slice, a 13 x 37 weight (481 values: 7 whole blocks of 64 and a partial one) crosses slice ends
    mid-way through the blocks' codes and ends in a partial slice; the values must not change."""
    import lora.quant

    monkeypatch.setattr(lora.quant, "DEQUANTIZE_BLOCKS", 3)
    weight = awkward_weight((13, 37), dtype, seed=7)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(quantize_nf4(weight).dequantize(), bnb_functional.dequantize_4bit(packed, state))


def test_ties_at_code_midpoints_go_to_the_lower_code_as_bitsandbytes():
    code = torch.tensor(NF4_CODE)
    midpoints = (code[:-1] + code[1:]) / 2
    # absmax 1, so each scaled value is the midpoint itself: exactly halfway between two codes
    weight = torch.cat([torch.ones(1), midpoints, torch.full((64 - 16,), 0.5)]).view(1, 64)
    packed, _ = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = quantize_nf4(weight, double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1))
    codes = torch.stack([ours.packed >> 4, ours.packed & 15], dim=1).view(-1)  # (64,), first value in the high nibble
    assert codes[0] == 15 and codes[1:16].tolist() == list(range(15))


def test_reciprocal_in_whole_blocks_and_division_in_the_last_one_as_bitsandbytes():
    # a value whose quotient by the absmax rounds across a code midpoint one way when divided and the
    # other way when multiplied by the reciprocal (found by search; fp32 values written exactly)
    absmax, value = torch.tensor([0.7654322981834412, -0.6491603255271912])
    midpoints = (torch.tensor(NF4_CODE)[:-1] + torch.tensor(NF4_CODE)[1:]) / 2
    assert torch.bucketize(value / absmax, midpoints) != torch.bucketize(value * (1.0 / absmax), midpoints)
    # block 0 is whole (64 values), block 1 is the partial last one (2 values); both hold the pair
    weight = torch.cat([torch.stack([absmax, value]), torch.zeros(62), torch.stack([absmax, value])]).view(1, 66)
    packed, _ = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(quantize_nf4(weight, double_quant=False).packed, packed.view(-1))


def test_nbytes_counts_codes_and_state():
    weight = awkward_weight((130, 257), torch.bfloat16)  # 33410 weights, 523 blocks of 64, 3 nested blocks of 256
    double = quantize_nf4(weight)
    assert double.nbytes == 16705 + 523 + 3 * 4 + 4
    assert quantize_nf4(weight, double_quant=False).nbytes == 16705 + 523 * 4
    layer = NF4Linear(double)
    assert nf4_bytes(nn.Sequential(layer)) == (double.nbytes, 33410 * 2)
    assert double.shape == torch.Size([130, 257]) and double.dtype == torch.bfloat16


def test_buffers_follow_the_device_never_a_dtype_cast():
    weight = awkward_weight((3, 70), torch.float32)
    q = quantize_nf4(weight)
    before = q.dequantize()
    assert set(q.state_dict()) == {"packed", "absmax", "nested_absmax", "offset"}
    layer = NF4Linear(q)
    layer.half()  # Module.half would cast fp32 state; the NF4 state keeps its dtypes
    assert q.packed.dtype == torch.uint8 and q.absmax.dtype == torch.uint8 and q.nested_absmax.dtype == torch.float32
    assert torch.equal(q.dequantize(), before)
    assert q.to("cpu") is q and q.device == torch.device("cpu")
    meta = quantize_nf4(weight).to("meta")
    assert meta.packed.is_meta and meta.offset.dtype == torch.float32


def make_nf4_linear(in_features=70, out_features=48, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    return linear, NF4Linear.from_linear(linear)


def test_nf4_linear_forward_and_backward_equal_f_linear_with_the_dequantized_weight():
    linear, layer = make_nf4_linear()
    assert (layer.in_features, layer.out_features) == (70, 48) and layer.bias is linear.bias
    weight = layer.weight.dequantize()
    x = torch.randn(2, 5, 70, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = layer(x)
    expected = F.linear(x_ref, weight, linear.bias)
    assert torch.equal(out, expected)
    grad = torch.randn(out.shape)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)
    assert x.grad.abs().sum() > 0


def test_nf4_linear_computes_in_the_input_dtype_and_under_autocast():
    linear, layer = make_nf4_linear(dtype=torch.bfloat16)
    x = torch.randn(4, 70)
    weight = layer.weight.dequantize()  # bf16, the stored dtype
    assert torch.equal(layer(x.bfloat16()), F.linear(x.bfloat16(), weight, linear.bias))
    assert torch.equal(layer(x), F.linear(x, weight.float(), linear.bias.float()))  # fp32 compute over bf16 weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x.bfloat16(), weight, linear.bias))


def saved_tensors(model, x) -> list[tuple]:
    """(numel, dtype) of every tensor autograd saves for backward during one forward: numel, since a
    saved weight may be its transposed view."""
    saved = []

    def pack(tensor):
        saved.append((tensor.numel(), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).sum().backward()
    return saved


def test_backward_keeps_no_dequantized_weight_alive():
    config = LoRAConfig(r"0", r=4, alpha=8)
    x = torch.randn(2, 5, 70, requires_grad=True)
    plain = nn.Sequential(nn.Linear(70, 48))
    inject_lora(plain, config)
    plain[0].weight.requires_grad_(False)
    # the check can fail: over a dense frozen weight, F.linear saves the (48, 70) weight for grad_input
    assert (48 * 70, torch.float32) in saved_tensors(plain, x)

    quantized = nn.Sequential(make_nf4_linear()[1])
    inject_lora(quantized, config)
    saved = saved_tensors(quantized, x)
    assert saved, "the LoRA branch saves its inputs, so the hook must have run"
    assert not [s for s in saved if s[0] == 48 * 70]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_refused_weights_name_the_module():
    with pytest.raises(ValueError, match=r"layers\.3\.q_proj .*float32/bfloat16/float16"):
        NF4Linear.from_linear(nn.Linear(8, 4).double(), module_path="layers.3.q_proj")
    with pytest.raises(ValueError, match=r"layers\.3\.k_proj .*empty"):
        NF4Linear.from_linear(nn.Linear(0, 4), module_path="layers.3.k_proj")
    with pytest.raises(ValueError, match=r"layers\.3\.v_proj .*blocksize 48"):
        NF4Linear.from_linear(nn.Linear(8, 4), blocksize=48, module_path="layers.3.v_proj")
    broken = nn.Linear(8, 4)
    with torch.no_grad():
        broken.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"head\.0 .*NaN"):
        NF4Linear.from_linear(broken, module_path="head.0")
    model = nn.ModuleDict({"decoder": nn.ModuleDict({"out_proj": nn.Linear(8, 4).double()})})
    with pytest.raises(ValueError, match=r"decoder\.out_proj"):
        replace_with_nf4(model, "decoder.out_proj")
    with pytest.raises(ValueError, match=r"2-D"):
        quantize_nf4(torch.randn(4, 4, 4), name="conv")
    with pytest.raises(ValueError, match=r"embed .*meta device"):
        NF4Linear.from_linear(nn.Linear(8, 4, device="meta"), module_path="embed")
    with pytest.raises(TypeError, match=r"LayerNorm at norm"):
        NF4Linear.from_linear(nn.LayerNorm(8), module_path="norm")


def test_replace_with_nf4_swaps_one_layer_and_frees_its_16bit_weight():
    model = nn.Sequential(nn.Linear(70, 48), nn.GELU(), nn.Linear(48, 33))
    x = torch.randn(3, 70)
    first = F.linear(x, quantize_nf4(model[0].weight).dequantize(), model[0].bias)
    expected = F.linear(F.gelu(first), model[2].weight, model[2].bias)
    dense = weakref.ref(model[0].weight)
    layer = replace_with_nf4(model, "0")
    gc.collect()
    assert dense() is None, "nothing may keep the 16-bit weight once the layer is swapped"
    assert model[0] is layer and isinstance(model[2], nn.Linear)
    assert torch.equal(model(x), expected)
    assert isinstance(layer.weight, NF4Tensor) and not list(layer.weight.parameters())
