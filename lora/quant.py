"""NF4 with double quantization, from scratch: the frozen 4-bit base of QLoRA.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314)
stores each frozen weight in 4 bits and trains LoRA in 16/32 bits on top. Three pieces, each
written here to equal bitsandbytes' ``quantize_4bit``/``dequantize_4bit`` (quant_type "nf4", its
CPU path) bit for bit: same packed bytes, same absmax state, same dequantized values.

1. **NormalFloat-4.** Weights are roughly N(0, σ); the 16 code values are quantiles of N(0, 1)
   so each is used about equally often: 8 positive ``Φ⁻¹(p)`` for 9 evenly spaced p from δ down
   to 0.5 (0.5 dropped), 7 negative ``-Φ⁻¹(p)`` for 8 such p (0.5 dropped again), and an exact
   zero, which a symmetric 4-bit code could not have; then all are divided by the largest, so
   the code spans [-1, 1]. δ = ½[(1 - 1/30) + (1 - 1/32)] = 0.9677083, the mean of the outermost
   bin centres for 15 and for 16 equal-probability bins, avoids Φ⁻¹(1) = ∞ (bitsandbytes'
   ``create_normal_map``). ``NF4_CODE`` holds the values as bitsandbytes hard-codes them.
2. **Blockwise absmax.** The flattened weight is cut into blocks of 64; each block is divided by
   its largest |w| (its *absmax*) and every value goes to the nearest code (ties to the lower).
   Two 4-bit codes share a byte, the first value in the high nibble; an odd count is padded with
   code 7 (the value 0.0), as bitsandbytes pads.
3. **Double quantization.** One fp32 absmax per 64 weights costs 32/64 = 0.5 bit per weight. The
   absmax values are all positive, so their mean is subtracted (kept as one fp32 ``offset``) and
   the centred values are quantized again, in blocks of 256, to 8-bit codes of bitsandbytes'
   signed *dynamic* map (Dettmers 2015, arXiv:1511.04561), with one fp32 ``nested_absmax`` per
   256: 8/64 + 32/(64·256) = 0.127 bit per weight, so 4.127 bits in all, the paper's figure.

Dequantizing is a table look-up times the block's absmax, in fp32, then a cast to the weight's
dtype. Where bitsandbytes' CPU code rounds in a particular way it is copied and said so inline.
Its CUDA kernels are separate code (a comparison tree for the 4-bit codes, a search instead of
the CPU's look-up table for the 8-bit ones) that the tests do not run, and on a GPU torch's own
mean may round differently: bit-identity is claimed against bitsandbytes on the CPU.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes accepts
ABSMAX_BLOCKSIZE = 256  # double quantization's block, fixed in bitsandbytes
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what bitsandbytes quantizes
LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer looks codes up in a 16-bit grid over [-1, 1]
DEQUANTIZE_BLOCKS = 65536  # blocks dequantized at a time (4M weights at block 64: 16 MB of fp32 temporaries)

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: for each decade 10^(i-6), i = 0..6, the midpoints of
    2^i + 1 evenly spaced points in [0.1, 1], both signs, plus 0 and 1. Small centred absmax
    values keep relative precision, as a float's exponent does. Built with bitsandbytes' own
    float32 steps, so it equals ``create_dynamic_map()`` exactly."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        scaled = (10 ** (i - 6) * ((edges[:-1] + edges[1:]) / 2.0)).tolist()
        values += scaled + [-v for v in scaled]
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


@functools.cache
def code_tables(device: torch.device) -> dict[str, torch.Tensor]:
    """The constant tables, built once per device: layers share them instead of each holding a copy."""
    nf4 = torch.tensor(NF4_CODE, dtype=torch.float32)
    dynamic = dynamic_map()
    # bitsandbytes' CPU quantizer maps v in [-1, 1] to the grid point round(65535·(v+1)/2) and reads the
    # code there; each grid point holds the first code whose midpoint with the next is not below it.
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    tables = {
        "nf4_midpoints": (nf4[:-1] + nf4[1:]) / 2,
        # byte b decodes to the pair (NF4[b >> 4], NF4[b & 15]): one gather unpacks and looks up
        "nf4_pairs": torch.stack([nf4.repeat_interleave(16), nf4.repeat(16)], dim=1),  # (256, 2)
        "dynamic": dynamic,
        "dynamic_lut": torch.searchsorted(0.5 * (dynamic[:-1] + dynamic[1:]), grid).to(torch.uint8),
    }
    return {name: table.to(device) for name, table in tables.items()}


def scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (n,) times the scale of the block each one sits in; the last block may be partial."""
    n, pad = values.numel(), scales.numel() * blocksize - values.numel()
    padded = (F.pad(values, (0, pad)) if pad else values).view(-1, blocksize)  # (n_blocks, blocksize)
    return (padded * scales[:, None]).view(-1)[:n]


def check_quantizable(weight: torch.Tensor, blocksize: int, name: str = "") -> None:
    """Refuse, naming the module, what bitsandbytes refuses (or would turn into NaN state)."""
    what = f"cannot quantize {name or 'the weight'} (shape {tuple(weight.shape)}, {weight.dtype}) to NF4"
    if weight.is_meta:
        raise ValueError(f"{what}: the weight is on the meta device; load its values before quantizing")
    if weight.ndim != 2:
        raise ValueError(f"{what}: only 2-D Linear weights are supported (bitsandbytes' matmul_4bit needs [out, in])")
    if weight.dtype not in DTYPES:
        raise ValueError(f"{what}: bitsandbytes quantizes only float32/bfloat16/float16; cast the layer first")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{what}: blocksize {blocksize} is not one of bitsandbytes' {BLOCKSIZES}")
    if weight.numel() == 0:
        raise ValueError(f"{what}: the weight is empty, so there is no absmax to quantize")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{what}: the weight holds NaN or inf, which would poison its block's absmax")


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True, name: str = "") -> "NF4Tensor":
    """Quantize a 2-D float weight to NF4, as ``bitsandbytes.functional.quantize_4bit(weight,
    blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")``."""
    check_quantizable(weight, blocksize, name)
    tables = code_tables(weight.device)
    flat = weight.detach().reshape(-1).float()  # (out*in,): blocks run over the row-major flattening
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)  # (n_full_blocks,)
    # bitsandbytes multiplies whole blocks by the reciprocal but divides the last, partial block, and
    # stores that block's absmax clamped; the two roundings differ in the last bit, so both are copied.
    scaled = (flat[:full].view(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).view(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    scaled = F.pad(scaled, (0, n % 2))  # an odd count is padded with 0.0, which quantizes to code 7
    # bucketize's default puts a value equal to a midpoint in the lower bin: ties go to the lower code
    codes = torch.bucketize(scaled, tables["nf4_midpoints"], out_int32=True).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(n/2),), the first value of a pair in the high nibble
    if not double_quant:
        return NF4Tensor(packed, absmax, weight.shape, weight.dtype, blocksize)
    offset = absmax.mean()
    absmax_codes, nested_absmax = quantize_absmax_8bit(absmax - offset, tables)
    return NF4Tensor(packed, absmax_codes, weight.shape, weight.dtype, blocksize, nested_absmax, offset)


def quantize_absmax_8bit(values: torch.Tensor, tables: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred absmax values (m,) -> (8-bit dynamic-map codes (m,), one fp32 absmax per 256), as
    bitsandbytes' CPU ``quantize_blockwise``: a look-up on a 16-bit grid, not an exact nearest search."""
    m = values.numel()
    n_blocks = -(-m // ABSMAX_BLOCKSIZE)
    padded = F.pad(values, (0, n_blocks * ABSMAX_BLOCKSIZE - m)).view(n_blocks, ABSMAX_BLOCKSIZE)  # (n_blocks, 256)
    nested_absmax = padded.abs().amax(dim=1)  # zero padding never raises a max of |values|
    nonzero = nested_absmax[:, None] > 0
    scaled = (padded * (1.0 / torch.where(nonzero, nested_absmax[:, None], 1.0))).clamp(-1, 1)
    # the C code's float steps, one rounding each, then truncation: ((v + 1) * 0.5) * 65535 + 0.5
    grid_index = ((scaled + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).to(torch.int32)
    codes = torch.where(nonzero, tables["dynamic_lut"][grid_index], 0)  # a block of zeros is written as code 0
    return codes.view(-1)[:m], nested_absmax


class NF4Tensor(nn.Module):
    """A weight held as NF4 codes plus their quantization state, all buffers of this module, so they
    follow ``model.to(device)``, ``state_dict()`` and DDP's broadcast of buffers.

    Buffers: ``packed`` uint8 (ceil(numel/2),), two codes a byte; ``absmax`` fp32 (n_blocks,), or
    with double quantization uint8 dynamic-map codes plus ``nested_absmax`` fp32
    (ceil(n_blocks/256),) and ``offset`` fp32 (). ``shape``, ``dtype`` (the original weight's) and
    ``blocksize`` are plain attributes. A module rather than a tensor subclass so LinearWithLoRA
    keeps it as ``weight`` unchanged, and the state_dict keys are ``<layer>.weight.packed``, ...
    """

    def __init__(self, packed, absmax, shape, dtype, blocksize, nested_absmax=None, offset=None):
        super().__init__()
        self.shape, self.dtype, self.blocksize = torch.Size(shape), dtype, blocksize
        self.double_quant = nested_absmax is not None
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("nested_absmax", nested_absmax)  # None registers nothing: no key in state_dict
        self.register_buffer("offset", offset)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes plus quantization state (the shared code tables are not counted)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block, undoing the double quantization if there is one."""
        if not self.double_quant:
            return self.absmax
        codes = code_tables(self.device)["dynamic"][self.absmax.int()]  # (n_blocks,) centred values in [-1, 1]
        centred = scale_blocks(codes, self.nested_absmax, ABSMAX_BLOCKSIZE)
        return centred + self.offset  # two roundings (multiply, then add), as bitsandbytes: no fused multiply-add

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight back as a dense tensor of ``shape``: code value times block absmax in fp32, cast
        to ``dtype`` (default: the original weight's dtype), as ``dequantize_4bit``.

        Written into the result a slice of blocks at a time: the fp32 products (and the int32 indices the
        look-up needs) then never exist for the whole weight at once, only the result does. Whole, a
        4096 x 11008 layer would pass through 0.5 GB of temporaries per call, in every forward and
        backward; the values are the same, since every step is elementwise."""
        n, blocksize = self.shape.numel(), self.blocksize
        weight = torch.empty(n, dtype=dtype or self.dtype, device=self.device)
        pairs, absmax = code_tables(self.device)["nf4_pairs"], self.block_absmax()
        step = DEQUANTIZE_BLOCKS * blocksize  # a whole number of blocks, even: a slice starts on a byte
        for start in range(0, n, step):
            stop = min(start + step, n)
            # index_select: a table look-up, 2x faster than [codes]
            codes = self.packed[start // 2 : (stop + 1) // 2].int()
            values = pairs.index_select(0, codes).view(-1)[: stop - start]  # (stop-start,)
            weight[start:stop] = scale_blocks(values, absmax[start // blocksize : -(-stop // blocksize)], blocksize)
        return weight.view(self.shape)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype)/.half() would cast the fp32 absmax state and silently change every weight:
        # buffers may move between devices, never change dtype.
        for key, buffer in self._buffers.items():
            if buffer is not None:
                moved = fn(buffer)
                self._buffers[key] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}")


class LinearNF4Function(torch.autograd.Function):
    """y = x·Wᵀ + b where W is dequantized from NF4 in forward and again in backward, so between the
    two only the 4-bit codes stay alive, never a dense copy of W (QLoRA; torchtune's ``linear_nf4``).
    W is frozen: backward returns grad_input = grad_out·W and no weight gradient."""

    @staticmethod
    def forward(ctx, x, weight: NF4Tensor, bias):
        ctx.weight = weight  # the module itself, not a saved tensor: nothing dense is kept for backward
        # As bitsandbytes: dequantize to the stored dtype, then cast to the compute dtype.
        return F.linear(x, weight.dequantize().to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out @ ctx.weight.dequantize().to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def linear_nf4(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for an NF4 weight, computed in x's dtype, or in the autocast dtype under autocast."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return LinearNF4Function.apply(x, weight, None if bias is None else bias.to(x.dtype))


class NF4Linear(nn.Module):
    """A frozen Linear whose weight is an NF4Tensor; ``bias`` stays the float Parameter it was (or None).
    Wrapped by LinearWithLoRA exactly like an nn.Linear: same lora_A/lora_B, same adapter keys."""

    def __init__(self, weight: NF4Tensor, bias: nn.Parameter | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, module_path: str = ""):
        """Quantize `linear`'s weight (on its device) and keep its bias. `linear` itself is not changed:
        its 16-bit weight is freed once the caller drops it, e.g. by replace_with_nf4."""
        if not isinstance(linear, nn.Linear):
            where = module_path or "<unnamed>"
            raise TypeError(f"NF4Linear.from_linear takes an nn.Linear, got {type(linear).__name__} at {where}")
        return cls(quantize_nf4(linear.weight, blocksize, double_quant, name=module_path), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_nf4(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def replace_with_nf4(model: nn.Module, path: str, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
    """Swap the nn.Linear at dotted `path` for its NF4Linear, one layer at a time, so a loader can
    quantize each layer as it arrives and the 16-bit weight is freed before the next one is read."""
    parent_path, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    layer = NF4Linear.from_linear(getattr(parent, child_name), blocksize, double_quant, module_path=path)
    setattr(parent, child_name, layer)
    return layer


def nf4_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the model's NF4 weights hold, bytes the same weights take in their original dtype):
    for blocksize 64 with double quantization about 0.516 vs 2 bytes a weight for bf16."""
    weights = [m for m in model.modules() if isinstance(m, NF4Tensor)]
    return sum(w.nbytes for w in weights), sum(w.shape.numel() * w.dtype.itemsize for w in weights)
