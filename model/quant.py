"""NF4 4-bit weights (QLoRA): a readable torch reference for quantize/dequantize, bitsandbytes' dequantize
kernels as the fast path (CUDA, and the CPU where they are equal and faster), and `Linear4bit`, the frozen
4-bit layer that takes an nn.Linear's place in the model.

Layout (byte-identical to `bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`):
the weight is flattened row-major and cut into blocks of `blocksize` values; each block keeps its absmax
(float32) and each value the index of the nearest NF4 code to value/absmax; two indices per byte, the first
element in the high nibble. Double quantisation (bnb's `compress_statistics`) stores absmax itself in 8 bits:
absmax minus its mean, blockwise (256) against bnb's signed dynamic 8-bit map.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# bitsandbytes' CPU backend logs a warning at import when the optional `kernels` package (a faster CPU 4-bit
# matmul, which we never call: we use only bnb's dequantize kernel) is missing. Quiet that one logger only.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# The 16 NormalFloat-4 code values: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero
# (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", Sec. 3 and Appendix E; the float32
# literals are bitsandbytes' table, csrc/kernels.cu dDequantizeNF4 and backends/utils.py _NF4_QUANT_TABLE).
NF4_CODE = torch.tensor([
    -1.0,                  # 0b0000
    -0.6961928009986877,   # 0b0001
    -0.5250730514526367,   # 0b0010
    -0.39491748809814453,  # 0b0011
    -0.28444138169288635,  # 0b0100
    -0.18477343022823334,  # 0b0101
    -0.09105003625154495,  # 0b0110
    0.0,                   # 0b0111
    0.07958029955625534,   # 0b1000
    0.16093020141124725,   # 0b1001
    0.24611230194568634,   # 0b1010
    0.33791524171829224,   # 0b1011
    0.44070982933044434,   # 0b1100
    0.5626170039176941,    # 0b1101
    0.7229568362236023,    # 0b1110
    1.0,                   # 0b1111
], dtype=torch.float32)
# Rounding = nearest code, a value exactly on a midpoint goes to the lower code. These float32 midpoints are
# bit for bit the thresholds of bnb's CUDA decision tree (dQuantizeNF4: `if (x > 0.03979014977812767f)` ...)
# and of its CPU path (torch.bucketize over the same midpoints), so either bnb build gives the same bytes.
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
_BYTES = torch.arange(256)
NF4_PAIRS = torch.stack((NF4_CODE[_BYTES >> 4], NF4_CODE[_BYTES & 0xF]), dim=1)  # byte -> its two codes

DQ_BLOCKSIZE = 256  # double quantisation: one float32 scale per 256 absmax values (bnb's choice)


def dynamic_map() -> torch.Tensor:
    """bnb's signed dynamic 8-bit map (`functional.create_dynamic_map(signed=True)`, Dettmers 2015,
    "8-Bit Approximations for Parallelism in Deep Learning"): for i = 0..6, 2^i values per sign at scale
    10^(i-6) (a dynamic exponent, a fraction that shrinks as it grows), plus 0 and 1; 256 sorted values,
    from -0.99297 to 1.0. Computed with bnb's float32 operations so every value is bit-identical."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map()


def nf4_quantize(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """w (any shape, fp32/fp16/bf16) -> (packed uint8 [numel/2], absmax float32 [numel/blocksize])."""
    if w.numel() % blocksize or blocksize % 2:
        raise ValueError(f"nf4_quantize: {w.numel()} values do not split into blocks of {blocksize}")
    blocks = w.detach().reshape(-1, blocksize).float()  # (n_blocks, blocksize), a float32 copy
    absmax = blocks.abs().amax(dim=1)
    # bnb multiplies by the reciprocal (not a division): the last bit differs, and so may a code.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    q = torch.bucketize(scaled, NF4_MIDPOINTS.to(w.device), out_int32=True).to(torch.uint8).reshape(-1)
    del blocks, scaled
    packed = (q[0::2] << 4) | q[1::2]  # first element in the high nibble
    return packed, absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of nf4_quantize: code[index] * absmax of its block, computed in float32, then cast to dtype."""
    # One lookup per byte in a (256, 2) table of (high-nibble code, low-nibble code): 2-4x faster than
    # splitting the nibbles first. F.embedding is the fastest gather torch has for this on the CPU.
    values = F.embedding(packed.int(), NF4_PAIRS.to(packed.device))  # (numel/2, 2) float32
    return (values.view(-1, blocksize) * absmax.float()[:, None]).to(dtype).reshape(shape)


def quantize_absmax(absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE):
    """Double quantisation of the NF4 block scales (bnb compress_statistics=True).
    -> (codes uint8 [n], scale float32 [ceil(n/blocksize)], offset float32 []).
    x = absmax - mean(absmax); per block of 256, x / max|x| goes to the nearest code of the dynamic map, a
    tie to the lower code (bnb's scalar CPU code, csrc/common.cpp quantize_block). bnb's AVX-512 CPU kernel
    normalises with an approximate reciprocal, so about 0.1-0.2% of the values, those nearest a midpoint, get
    the neighbouring code there (bitsandbytes 0.50 on an AVX-512 EPYC, 2026-12-08: 0.17% of the scale codes of
    twenty 3072x1024 N(0, 0.02) weights, 0.21% for U(-0.02, 0.02) weights, 0.1% for tests/test_quant.py's
    50,000 uniform scales); dequantising a given state is bit-identical either way (tests/test_quant.py)."""
    offset = absmax.float().mean()
    x = absmax.float() - offset
    n = x.numel()
    n_blocks = -(-n // blocksize)
    xb = F.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)  # zero padding leaves max|x| alone
    scale = xb.abs().amax(dim=1)
    normed = (xb / torch.where(scale > 0, scale, 1.0)[:, None]).reshape(-1)[:n]
    code = DYNAMIC_CODE.to(x.device)
    lo = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, code.numel() - 2)  # code[lo] <= x
    hi = lo + 1
    idx = torch.where((normed - code[hi]).abs() < (normed - code[lo]).abs(), hi, lo)
    return idx.to(torch.uint8), scale, offset


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    """codes uint8 [n] -> absmax float32 [n] = code[c] * scale[block] + offset (bnb's order of operations)."""
    values = DYNAMIC_CODE.to(codes.device)[codes.long()]
    return values * scale.repeat_interleave(blocksize)[: codes.numel()] + offset


_bnb_state_code: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # NF4 and dynamic maps per device


def _bnb_dequantize(weight: torch.Tensor, state: tuple, shape: tuple[int, int], blocksize: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The fast path: bitsandbytes' dequantize kernel fed a QuantState built from our buffers (the bytes are
    bnb's own layout, so nothing is converted). state as for dequantize_nf4."""
    import bitsandbytes.functional as bnbf

    dev = weight.device
    if dev not in _bnb_state_code:
        _bnb_state_code[dev] = (NF4_CODE.to(dev), DYNAMIC_CODE.to(dev))
    nf4, dyn = _bnb_state_code[dev]
    if len(state) == 3:
        absmax_q, absmax_scale, absmax_offset = state
        state2 = bnbf.QuantState(absmax=absmax_scale, code=dyn, blocksize=DQ_BLOCKSIZE, dtype=torch.float32)
        qs = bnbf.QuantState(absmax=absmax_q, shape=shape, code=nf4, blocksize=blocksize, quant_type="nf4",
                             dtype=dtype, offset=absmax_offset, state2=state2)
    else:
        qs = bnbf.QuantState(absmax=state[0], shape=shape, code=nf4, blocksize=blocksize, quant_type="nf4",
                             dtype=dtype)
    return bnbf.dequantize_4bit(weight.view(-1, 1), qs)


def bitsandbytes_problem(device) -> str | None:
    """Why bitsandbytes' kernels could not run on `device`, in one line, or None. On CUDA bitsandbytes loads the
    library built for torch's CUDA version (libbitsandbytes_cuda<major><minor>.so) when it is imported; when that
    fails it keeps going with a stand-in that raises only at the first kernel call, which for a training run is
    the first forward, after minutes of loading weights. The CPU has nothing to check: its dequantize_4bit is
    native code too when bnb's library loads (libbitsandbytes_cpu.so, or the CUDA one, which holds the CPU
    kernels as well; bitsandbytes 0.50), but where it does not load bnb registers no native CPU kernels and its
    torch implementation (backends/default) serves every CPU call, so nothing fails late."""
    if torch.device(device).type != "cuda":
        return None
    bnb_log = logging.getLogger("bitsandbytes.cextension")
    level = bnb_log.level
    bnb_log.setLevel(logging.CRITICAL)  # its load error comes with a traceback and a page of advice; ours: one line
    try:
        import bitsandbytes
        from bitsandbytes import cextension
    except ImportError as e:
        return f"bitsandbytes does not import ({e}): pip install 'bitsandbytes>=0.46'"
    finally:
        bnb_log.setLevel(level)
    stand_in = getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", None)
    if stand_in is None or not isinstance(getattr(cextension, "lib", None), stand_in):
        return None  # loaded (or a bitsandbytes whose internals differ: then its own error stands)
    pattern = re.compile(r"libbitsandbytes_cuda(\d+)\.so")
    found = [pattern.fullmatch(name) for name in os.listdir(os.path.dirname(bitsandbytes.__file__))]
    ships = sorted((m.group(1) for m in found if m), key=int)
    versions = ", ".join(f"{v[:-1]}.{v[-1]}" for v in ships) or "none"
    why = (str(getattr(cextension.lib, "error_msg", "")).strip().splitlines() or [""])[0]
    return (f"bitsandbytes {bitsandbytes.__version__} could not load its CUDA library for torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}){f': {why}' if why else ''}; it ships libraries for "
            f"CUDA {versions}: install a bitsandbytes built for CUDA {torch.version.cuda} (pip install -U "
            f"bitsandbytes), or set BNB_CUDA_VERSION to one of those that this machine's driver runs")


def dequantize_nf4(weight: torch.Tensor, state: tuple, shape: tuple[int, int], blocksize: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Packed NF4 bytes -> [out, in] in dtype, a fresh tensor. state: (absmax,), or (absmax_q, absmax_scale,
    absmax_offset) with double quantisation (Linear4bit.quant_state). bitsandbytes' kernels on CUDA; on the CPU
    too, where they are bit-identical to nf4_dequantize and faster. Min over 5-20 calls of nf4_dequantize vs
    bnb.functional.dequantize_4bit on randn weights, 2-core AVX-512 CI box, 2026-11-25:
      576x1536   fp32: ours 0.62 ms, bnb 0.11 ms    bf16: ours 0.73 ms, bnb 0.09 ms
      3072x8192  fp32: ours 167 ms,  bnb 64 ms      bf16: ours 269 ms,  bnb 48 ms
    bnb's CPU kernel walks blocks row by row, so it disagrees with its own quantize_4bit layout when a row is
    not a whole number of blocks (checked: 128x96): those shapes take the reference path (dequant_path)."""
    if dequant_path(shape, blocksize, weight.device, dtype).kernel == "bitsandbytes":
        return _bnb_dequantize(weight, state, shape, blocksize, dtype)
    return nf4_dequantize(weight, absmax_of(state), shape, blocksize, dtype)


def absmax_of(state: tuple) -> torch.Tensor:
    """The fp32 block scales of a quant state (dequantize_nf4's), decoding them with double quantisation."""
    return dequantize_absmax(*state) if len(state) == 3 else state[0]


@dataclass(frozen=True)
class DequantPath:
    """How Linear4bit.dequantize runs for one weight: the kernel, and the bytes it allocates while it runs
    (its output included; all freed once the matmul that needed the weight returns)."""
    kernel: str  # "bitsandbytes" | "torch" (nf4_dequantize, the reference)
    transient_bytes: int


def dequant_path(shape: tuple[int, int], blocksize: int, device, dtype: torch.dtype,
                 double_quant: bool = False) -> DequantPath:
    """The dispatch rule of Linear4bit.dequantize, stated once (engine/ledger.py predicts memory from it too).
    bitsandbytes' kernel on CUDA, and on the CPU when each row is a whole number of blocks (bnb's CPU kernel
    walks blocks row by row, so it disagrees with its own quantize_4bit layout otherwise, e.g. 128x96); it
    writes the output and, with double quantisation, the fp32 absmax first. The torch reference holds at its
    peak the (numel/2, 2) fp32 code lookup, their product with absmax (fp32) and the cast output."""
    out_f, in_f = shape
    n, item = out_f * in_f, torch.finfo(dtype).bits // 8
    dev = torch.device(device).type
    if dev == "cuda" or (dev == "cpu" and in_f % blocksize == 0):
        return DequantPath("bitsandbytes", n * item + (4 * (n // blocksize) if double_quant else 0))
    return DequantPath("torch", n * (8 + (item if item != 4 else 0)))


class _NF4Linear(torch.autograd.Function):
    """y = x @ W^T with W dequantized on the fly. Plain F.linear(x, layer.dequantize()) would save the
    dequantized W (out*in*2 bytes per layer) for backward, defeating the 4-bit storage; here backward
    dequantizes again (what bnb's MatMul4Bit does). The layer is kept by reference on ctx, not through
    save_for_backward: its packed bytes are already resident, and saved-tensor hooks (save_on_cpu offload)
    would otherwise copy them to the CPU on every step. No weight gradient: the base weight is frozen."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.dequantize(grad_out.dtype)  # (out, in), freed when backward of this layer returns
        return grad_out @ w, None  # (..., out) @ (out, in) -> (..., in)


# torch.compile traces _NF4Linear into one forward+backward graph, where the forward's dequantize and the
# backward's are the same call on the same buffers: the graph's common-subexpression pass merges them, and the
# dequantized weight becomes a tensor saved from forward to backward, out*in*2 bytes per projection (201 MB a
# block at Llama 3.2 3B shapes in bf16), the very cost _NF4Linear exists to avoid (measured: the compiled
# graph's saved values listed the four [out, in] weights of the MLP and o_proj). As two opaque ops, forward and
# backward each dequantize inside their own call, and the graph keeps only the packed buffers, as eager does.
@torch.library.custom_op("clauselora::nf4_linear", mutates_args=())
def nf4_linear(x: torch.Tensor, weight: torch.Tensor, state: list[torch.Tensor], shape: list[int],
               blocksize: int) -> torch.Tensor:
    """x @ W^T, W (shape) dequantized from the packed weight and its state (Linear4bit.quant_state) in x's dtype
    for this product only: _NF4Linear's forward as one op, for compiled code."""
    return F.linear(x, dequantize_nf4(weight, tuple(state), tuple(shape), blocksize, x.dtype))


@nf4_linear.register_fake
def _(x, weight, state, shape, blocksize):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.custom_op("clauselora::nf4_linear_input_grad", mutates_args=())
def nf4_linear_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, state: list[torch.Tensor],
                          shape: list[int], blocksize: int) -> torch.Tensor:
    """grad_out @ W: nf4_linear's input gradient, W dequantized again in grad_out's dtype (_NF4Linear.backward)."""
    return grad_out @ dequantize_nf4(weight, tuple(state), tuple(shape), blocksize, grad_out.dtype)


@nf4_linear_input_grad.register_fake
def _(grad_out, weight, state, shape, blocksize):
    return grad_out.new_empty((*grad_out.shape[:-1], shape[1]))


def _nf4_linear_setup(ctx, inputs, output):
    _, weight, state, shape, blocksize = inputs
    ctx.save_for_backward(weight, *state)
    ctx.shape, ctx.blocksize = shape, blocksize


def _nf4_linear_backward(ctx, grad_out):
    weight, *state = ctx.saved_tensors
    grad_x = nf4_linear_input_grad(grad_out, weight, state, ctx.shape, ctx.blocksize) \
        if ctx.needs_input_grad[0] else None
    return grad_x, None, [None] * len(state), None, None


nf4_linear.register_autograd(_nf4_linear_backward, setup_context=_nf4_linear_setup)


def _keep_dtype(fn, keep_ids):
    """Wrap nn.Module._apply's fn so the tensors in keep_ids only change device, never dtype:
    `model.to(torch.bfloat16)` must not round the float32 quant state (or fp32 LoRA master weights)."""
    def apply(t):
        out = fn(t)
        return t.to(device=out.device) if id(t) in keep_ids and out.dtype != t.dtype else out
    return apply


class Linear4bit(nn.Module):
    """A frozen NF4 linear layer. Buffers (all in the state dict under this module's prefix):
      weight        uint8 [out*in/2]    packed NF4 indices, so the key stays `...q_proj.weight`
      absmax        float32 [n_blocks]  per-block scale                       (double_quant=False)
      absmax_q      uint8 [n_blocks]    8-bit codes of absmax - offset        (double_quant=True)
      absmax_scale  float32 [n_blocks/256], absmax_offset float32 []          (double_quant=True)
    Bytes held: out*in/2 + 4*out*in/64 (0.5625 byte/weight), or out*in/2 + out*in/64 + ~4*out*in/16384 with
    double quantisation (0.516 byte/weight), against 2 bytes/weight in fp16."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 compute_dtype: torch.dtype = torch.float32, double_quant: bool = False, blocksize: int = 64,
                 device=None):
        super().__init__()
        if (in_features * out_features) % blocksize:
            raise ValueError(f"Linear4bit: {out_features}x{in_features} is not a multiple of blocksize {blocksize}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.double_quant, self.blocksize = compute_dtype, double_quant, blocksize
        n = in_features * out_features
        n_blocks = n // blocksize
        self.register_buffer("weight", torch.zeros(n // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_q", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(-(-n_blocks // DQ_BLOCKSIZE), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    compute_dtype: torch.dtype = torch.float32, double_quant: bool = False,
                    blocksize: int = 64) -> "Linear4bit":
        """Quantize an [out, in] weight on its own device (the loader calls this tensor by tensor)."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias is not None, compute_dtype=compute_dtype, double_quant=double_quant,
                    blocksize=blocksize, device="meta")
        packed, absmax = nf4_quantize(weight, blocksize)
        layer.weight = packed  # assigning a tensor to a registered buffer name replaces the buffer
        if double_quant:
            layer.absmax_q, layer.absmax_scale, layer.absmax_offset = quantize_absmax(absmax)
        else:
            layer.absmax = absmax
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        return layer

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def state_names(self) -> tuple[str, ...]:
        return ("absmax_q", "absmax_scale", "absmax_offset") if self.double_quant else ("absmax",)

    def absmax_values(self) -> torch.Tensor:
        return absmax_of(self.quant_state())

    def quant_state(self) -> tuple[torch.Tensor, ...]:
        """The state tensors dequantize_nf4 takes, in state_names() order."""
        return tuple(getattr(self, n) for n in self.state_names())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """-> [out, in] in dtype (default compute_dtype); a fresh tensor of out*in*itemsize bytes."""
        return dequantize_nf4(self.weight, self.quant_state(), self.shape, self.blocksize, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Autocast (fp16/bf16 training on GPU) decides the matmul dtype; otherwise compute_dtype does.
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = self.compute_dtype
        if torch.compiler.is_compiling():  # Block.set_compiled: the same product as an opaque op (nf4_linear)
            out = nf4_linear(x.to(dtype), self.weight, list(self.quant_state()), list(self.shape), self.blocksize)
        else:
            out = _NF4Linear.apply(x.to(dtype), self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def nbytes(self) -> int:
        """Bytes held by the quantized weight: packed codes + quant state."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn, recurse=True):
        keep = {id(getattr(self, n)) for n in self.state_names()}
        return super()._apply(_keep_dtype(fn, keep), recurse)

    def extra_repr(self) -> str:
        packed = self.weight.numel()
        state = self.nbytes() - packed
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={str(self.compute_dtype).replace('torch.', '')}, "
                f"bytes={packed}+{state} (fp16 {2 * self.in_features * self.out_features})")


def quantize_linear(linear: nn.Linear, **kw) -> Linear4bit:
    """nn.Linear -> Linear4bit with the same weight (and bias), kw as for Linear4bit.from_weight."""
    return Linear4bit.from_weight(linear.weight, linear.bias, **kw)
