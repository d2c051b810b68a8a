"""A Llama 3.x decoder written out in full: RMSNorm, RoPE (with llama3 scaling), GQA attention via SDPA,
SwiGLU MLP, decoder blocks. Attribute names equal the Hugging Face checkpoint keys, so a state dict loads
by a checked dict copy (model/load.py) and LoRA/NF4 layers are module swaps (model/lora.py, model/quant.py)."""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig


# The hand-written backwards below (RMSNorm, SwiGLU) work in fp32 on at most this many elements at a time (64 MiB
# per fp32 temporary), into gradients allocated once in the inputs' dtype: over a whole long-context batch their
# fp32 upcasts were several [tokens, width] fp32 tensors at once (engine/ledger.py counts what is left).
BACKWARD_CHUNK = 1 << 24


def _row_chunks(width: int) -> int:
    """Rows of `width` elements per chunk of the hand-written backwards. Compiled (Block.set_compiled), one chunk:
    the compiler fuses the backward into one kernel that keeps nothing in fp32, while a chunk loop, traced, made
    it write each chunk's fp32 values and a new full-size gradient per chunk (measured at 32K tokens on the CPU:
    3 × 64 MiB of fp32 chunks and 4 × 96 MiB of copies, +30% over the ledger; one chunk: within 1%)."""
    if torch.compiler.is_compiling():
        return 1 << 62
    return max(1, BACKWARD_CHUNK // width)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward that keeps the input in its own dtype and one fp32 rsqrt per row.
    Autograd through HF's ops (x.float(), pow, mean, rsqrt, mul) would keep the fp32 copy of the input: under
    bf16/fp16 that is twice the bytes, for every norm of every block. Forward computes what RMSNorm._plain
    computes, bit for bit, scaling its own output in place; backward works BACKWARD_CHUNK elements at a time."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        r = _inv_rms(x, eps)  # (..., 1) fp32
        xh = (x * r).to(x.dtype)  # x * r computes in fp32 (r's dtype): as x.float() * r, without the copy
        ctx.save_for_backward(x, weight, r)
        # xh is this function's own tensor: scaled in place (the same products as weight * xh, one tensor fewer).
        # Not when compiled: the compiler fuses weight * xh into one kernel anyway, and torch 2.11's AOT autograd
        # returned a wrong input gradient for the in-place form (tests/test_compile.py; right in 2.13)
        if weight.dtype == xh.dtype and not torch.compiler.is_compiling():
            return xh.mul_(weight)
        return weight * xh

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        H = x.shape[-1]
        x2, g2, r2 = x.reshape(-1, H), g.reshape(-1, H), r.reshape(-1, 1)
        gx = torch.empty_like(x2) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(H, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        rows = _row_chunks(H)
        for i in range(0, x2.shape[0], rows):
            xc, gc, rc = x2[i:i + rows], g2[i:i + rows], r2[i:i + rows]
            xhat = xc.float() * rc  # fp32 (never in place: for fp32 x, .float() is x itself)
            if gx is not None:
                # y = w * xhat, xhat = xf * r, r = (mean(xf^2) + eps)^-1/2:
                # dxf = r * (d_xhat - xhat * mean(d_xhat * xhat))   (d_xhat in fp32, rounded to x's dtype first
                # as autograd does, since xhat is stored in x's dtype in the forward)
                dxh = (gc * weight).to(x.dtype).float()
                mean = (dxh * xhat).mean(-1, keepdim=True)
                gx[i:i + rows] = dxh.sub_(xhat * mean).mul_(rc)
                del dxh
            if gw is not None:
                gw += (gc * xhat.to(x.dtype)).float().sum(0)
        return (gx.view_as(x) if gx is not None else None), (gw.to(weight.dtype) if gw is not None else None), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 whatever the compute dtype (fp16 squares overflow at |x| > 256), as HF does.
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        return self._plain(x)

    def _plain(self, x):
        return self.weight * (x * _inv_rms(x, self.eps)).to(x.dtype)


def _inv_rms(x, eps: float):
    """1 / sqrt(mean(x^2) + eps) over the last dim, (..., 1) in fp32 whatever x's dtype. x.float().pow(2).mean()
    made two fp32 temporaries of x's size (the copy and its square); vector_norm makes one: on the CPU (torch 2.13,
    measured) it still copies a bf16/fp16 x to fp32 before reducing (256 MiB above the 128 MiB bf16 input, against
    513 MiB for the plain form), and an fp32 x not at all. Its CUDA behaviour was not measured."""
    n = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.rsqrt(n.square() / x.shape[-1] + eps)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim/2,), float32, with the llama3 long-context rescaling."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    s = cfg.rope_scaling
    if not s:
        return inv
    # llama3 (DESIGN.md): frequencies whose wavelength is longer than orig/low are divided by `factor` (those
    # wavelengths grow `factor` times), shorter than orig/high are kept, and the band in between is interpolated.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    orig = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)  # HF's half-split layout (GGUF's interleaved rows are undone on import)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x, cos, sin, sign: int):
    """x * cos + rotate_half(x) * sin * sign, written half by half into one output: with x = [x1, x2] and the
    tables' halves equal (Llama.rope repeats its frequencies), the result is [x1 c - x2 s, x2 c + x1 s]. Four
    kernels and one allocation, where the plain expression makes a negated half, a concatenation and two
    products before the sum. The output keeps x's memory layout (empty_like), as the plain expression does."""
    h = x.shape[-1] // 2
    c, s = cos[..., :h], sin[..., :h]
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty_like(x)
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2).addcmul_(x1, s, value=sign)
    return out


class _RopeFn(torch.autograd.Function):
    """RoPE with a hand-written backward: the rotation's transpose is the rotation by -angle, so the gradient
    is _rotate(g, cos, -sin) and only the shared cos/sin tables are saved (as autograd through the plain
    expression saves them). cos and sin take no gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rotate(g, cos, sin, -1), None, None


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin (HF's form, the reference in tests/test_model.py), fused by hand in eager
    mode; cos and sin (..., hd) must repeat their first half, as Llama.rope builds them. Under torch.compile the
    plain expression, which the compiler fuses itself; and the hand-fused writes into the two halves of one
    output came out wrong when compiled with dynamic shapes (torch 2.13, the aot_eager backend; static shapes
    were right), which the compiled-block test caught."""
    if torch.compiler.is_compiling():
        return x * cos + rotate_half(x) * sin
    assert not (cos.requires_grad or sin.requires_grad), "the RoPE tables take no gradient"
    return _RopeFn.apply(x, cos, sin)


class KVCache:
    """Preallocated keys/values for every layer: (B, n_kv, max_len, hd) each. `pos` is the number filled."""

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k, v):
        t = k.shape[2]
        assert self.pos + t <= self.max_len, "KV cache overflow: raise max_len"
        self.k[layer][:, :, self.pos:self.pos + t] = k
        self.v[layer][:, :, self.pos:self.pos + t] = v
        return self.k[layer][:, :, :self.pos + t], self.v[layer][:, :, :self.pos + t]


@dataclass(frozen=True)
class AttentionPath:
    """How one Attention call runs SDPA: which kernel it gets, whether k/v are copied to every query head
    first, whether a boolean mask is passed, and whether packed rows run one causal call per segment."""
    kernel: str  # "flash" | "efficient" (memory-efficient) | "math"
    expand_kv: bool
    masked: bool
    segmented: bool = False


def attention_path(n_heads: int, n_kv: int, device, *, packed: bool = False, masked: bool = False,
                   capability: tuple[int, int] | None = None) -> AttentionPath:
    """The dispatch rule of Llama.hidden and Attention.forward, stated once (engine/ledger.py predicts memory
    from it too). `packed`: the rows carry segment ids (several examples per row). `masked`: a boolean mask is
    needed anyway: left padding in batched generation, a KV cache, segment ids that recur within a row, or
    Llama.segment_attention switched off.
    Packed rows without such a reason take the segment path: one is_causal SDPA call per run of equal segment
    id (padding is a run of its own), so no (B, 1, T, T) mask exists and SDPA keeps its fused kernels; it is
    exact, the same attention as the mask. Otherwise packed rows pass the mask.
    Only the flash kernels take grouped k/v: on CUDA from sm 80 without a mask, and on the CPU with or without
    one where this torch's CPU flash kernel takes them (cpu_flash_takes_grouped_kv; torch 2.13's does). Elsewhere,
    with a mask on CUDA or on GPUs without flash attention (T4, sm 75), SDPA would fall back to its math kernel,
    which stores the whole (B, n, T, T) attention matrix, so k/v are copied to every head and SDPA takes the
    memory-efficient kernel (on CUDA) or stays on flash (CPU). `capability` defaults to the device's own, or
    sm 80 for a CUDA device this process cannot see (a prediction for another machine)."""
    dev = torch.device(device)
    if dev.type == "cuda" and capability is None:
        capability = torch.cuda.get_device_capability(dev) if torch.cuda.is_available() else (8, 0)
    flash = dev.type != "cuda" or capability[0] >= 8
    kernel = "flash" if dev.type != "cuda" or (flash and not masked) else "efficient"
    grouped = cpu_flash_takes_grouped_kv(masked) if dev.type == "cpu" else flash and not masked
    return AttentionPath(kernel=kernel, expand_kv=n_kv != n_heads and not grouped, masked=masked,
                         segmented=packed and not masked)


@functools.cache
def cpu_flash_takes_grouped_kv(masked: bool) -> bool:
    """Whether this torch's CPU flash kernel takes grouped k/v (enable_gqa=True), with a boolean mask when
    `masked`: probed once per process on tiny tensors, the flash kernel alone, against k/v copied to every head.
    Forward only and without autograd, so the probe saves no tensor into whatever saved-tensor hooks are active
    at the first call (a checkpoint, the ledger's measurement); tests/test_cpu_gqa_mask.py checks the gradients.
    torch 2.13's takes them with and without a mask: the same output and gradients as the copies, k/v kept at
    n_kv heads instead of n (a third for SmolLM2), and faster where the copy is most of the work (2026-12-08,
    one thread): a SmolLM2-135M decode step after 1,600 cached tokens took 35.5-36.8 ms against 40.9-41.7 ms
    copied in fp32, 57-58 ms against 59-61 ms in bf16; a masked training step at B=2, T=1024 (fp32, 8 blocks)
    was the same within noise. Where a build refuses them (some torch builds' CPU dispatch took grouped k/v
    nowhere), SDPA would fall back to its math kernel: k/v are then copied."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 8, 16, generator=g, device="cpu")  # the CPU's, whatever default device is set
    k, v = torch.randn(2, 1, 2, 8, 16, generator=g, device="cpu")
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool, device="cpu").tril() if masked else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a refusal's "Flash attention kernel not used because" notes
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked, enable_gqa=True)
        except RuntimeError:  # "No available kernel": this build's flash kernel refused grouped k/v
            return False
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                             attn_mask=mask, is_causal=not masked)
    return torch.allclose(y, ref, atol=1e-5)


@dataclass(frozen=True)
class Segments:
    """Packed rows as runs of equal segment id: their lengths, row after row, adding up to B*T."""
    lengths: tuple[int, ...]


def segment_runs(segment_ids: torch.Tensor) -> Segments | None:
    """The runs of equal id in each row of segment_ids (B, T); None when an id recurs later in its row (its
    runs would then not be its example: the mask path handles that). One host sync per forward."""
    seg = segment_ids.cpu()  # the sync: the run lengths become Python ints for split()
    B, T = seg.shape
    start = torch.ones(B, T, dtype=torch.bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    rows, cols = start.nonzero(as_tuple=True)  # every row starts a run at 0, so no run crosses rows
    pairs = torch.stack([rows, seg[rows, cols]])
    if torch.unique(pairs, dim=1).shape[1] != pairs.shape[1]:
        return None
    flat = torch.cat([rows * T + cols, torch.tensor([B * T])])
    return Segments(tuple(torch.diff(flat).tolist()))


def _sdpa_per_segment(q, k, v, lengths, gqa):
    """Causal SDPA on each run of `lengths` (the examples of every row, one after another): (B, n, T, hd) q and
    (B, n_kv, T, hd) k, v -> (B*T, n, hd). split() keeps views, and its backward is one cat per tensor (slicing
    each run would zero-fill a whole q-sized gradient per run)."""
    B, n, T, hd = q.shape
    # (B, n, T, hd) -> (B*T, n, hd): a view when q was (B, T, n, hd) in memory, as the projections leave it
    qs, ks, vs = (t.transpose(1, 2).reshape(B * T, t.shape[1], hd).split(lengths) for t in (q, k, v))
    out = [F.scaled_dot_product_attention(a.transpose(0, 1)[None], b.transpose(0, 1)[None], c.transpose(0, 1)[None],
                                          is_causal=True, enable_gqa=gqa)[0].transpose(0, 1)  # (L, n, hd)
           for a, b, c in zip(qs, ks, vs)]
    return torch.cat(out)  # (B*T, n, hd); a copy of the outputs, which o_proj's LoRA then keeps


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        """mask: None (causal), a boolean (B, 1, T, S) tensor (build_mask), or Segments (packed rows)."""
        return self.o_proj(self.attend(*self.project(x, cos, sin), mask, cache, layer))

    def project(self, x, cos, sin):
        """q (B, n, T, hd), k and v (B, n_kv, T, hd), RoPE applied: tensors in, tensors out (Block.set_compiled)."""
        B, T, _ = x.shape
        # (B, T, n*hd) -> (B, n, T, hd)
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, T, hd) -> (B, 1, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(self, q, k, v, mask, cache=None, layer=0):
        """SDPA by attention_path's rule -> (B, T, n*hd), before o_proj."""
        B, _, T, _ = q.shape
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, T_past + T, hd)
        path = attention_path(self.n_heads, self.n_kv, q.device, packed=isinstance(mask, Segments),
                              masked=torch.is_tensor(mask))
        if path.expand_kv:  # keeps SDPA off its O(T^2)-memory math kernel (see attention_path)
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)  # (B, n_kv, S, hd) -> (B, n, S, hd)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        gqa = self.n_kv != self.n_heads and not path.expand_kv
        if path.segmented:
            return _sdpa_per_segment(q, k, v, mask.lengths, gqa).view(B, T, self.n_heads * self.hd)
        if path.masked:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)  # (B, n, T, hd) -> (B, T, n*hd)


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward: autograd through F.silu and * would also keep
    silu(gate), one more [tokens, intermediate] tensor per block (64 MiB per block at Llama 3.2 3B, B=2, T=2048,
    bf16). Backward recomputes sigmoid(gate) in fp32, BACKWARD_CHUNK elements at a time, into gradients
    allocated once in the inputs' dtype."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        want_gate, want_up = ctx.needs_input_grad[:2]
        g_gate = torch.empty_like(gate) if want_gate else None
        g_up = torch.empty_like(up) if want_up else None
        width = gate.shape[-1]
        rows = _row_chunks(width)
        flat = [t.reshape(-1, width) if t is not None else None for t in (g, gate, up, g_gate, g_up)]
        for i in range(0, flat[1].shape[0], rows):
            gc, ga, u, out_gate, out_up = (t[i:i + rows] if t is not None else None for t in flat)
            gf = ga.to(torch.promote_types(ga.dtype, torch.float32))  # fp32 for bf16/fp16, fp64 stays fp64
            sig = torch.sigmoid(gf)
            if want_up:  # g * silu(gate), silu rounded to the inputs' dtype as the forward rounded it
                torch.mul(gc, (gf * sig).to(ga.dtype), out=out_up)
            if want_gate:  # g * up * d silu(x)/dx, with d silu(x)/dx = sig(x) * (1 + x * (1 - sig(x))), in place
                d = torch.rsub(sig, 1).mul_(gf).add_(1).mul_(sig)
                del gf, sig  # at most three fp32 chunk-sized tensors are alive at once
                out_gate.copy_(d.mul_(gc * u))
                del d  # gone before the next chunk's upcast, or that chunk would have four (measured at 32K)
        return g_gate, g_up


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return self.down_proj(_SiluMul.apply(gate, up))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    # Block.set_compiled replaces these two with torch.compile'd versions; attention itself stays eager (its mask may be
    # Segments, whose run lengths change with every packed batch and would recompile each time)
    _qkv = None
    _out = None

    def forward(self, x, cos, sin, mask, cache=None):
        qkv, out = (self.qkv, self.out) if self._qkv is None else (self._qkv, self._out)  # eager: the reference
        if self._tiled(x):
            # long rows: out's tiles run the compiled norm + MLP (dynamo cannot trace the tiles' checkpoints from
            # inside a compiled region), and qkv runs eagerly: compiled, its backward held the three projections'
            # input gradients and its own buffers at once, about six [tokens, hidden] tensors (4.25 x tokens x
            # hidden x 4 bytes above the eager one's at 32K and 64K tokens in fp32 on the CPU, 11% over the ledger)
            qkv, out = self.qkv, self.out
        return out(x, self.self_attn.attend(*qkv(x, cos, sin), mask, cache, self.index))

    def _tiled(self, x) -> bool:
        return bool(self.mlp_tile) and x.shape[0] * x.shape[1] > self.mlp_tile

    def qkv(self, x, cos, sin):
        """input norm, q/k/v projections (LoRA included) and RoPE: everything before SDPA."""
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def out(self, x, y):
        """o_proj and the residual, post-attention norm, SwiGLU MLP and the residual: everything after SDPA."""
        x = x + self.self_attn.o_proj(y)
        if self._tiled(x):
            return token_tiles(self._mlp_residual or self.mlp_residual, x, self.mlp_tile)
        return self.mlp_residual(x)

    # tokens per MLP tile (Llama.set_mlp_tile); 0 runs the MLP over the whole batch at once
    mlp_tile = 0
    _mlp_residual = None

    def mlp_residual(self, x):
        """x + MLP(norm(x)): token by token, so it can run on any slice of the tokens (token_tiles)."""
        return x + self.mlp(self.post_attention_layernorm(x))

    def set_compiled(self, enabled: bool = True, **kw):
        """torch.compile the elementwise-heavy parts of the block (qkv, out: norms, LoRA scaling and adds,
        RoPE, SwiGLU, casts), fused by the compiler; kw go to torch.compile (default dynamic=True: packed
        batches change T every step). With MLP tiles (mlp_tile) only the tiles' norm + MLP run compiled (forward).
        enabled=False restores the eager path."""
        if not enabled:
            self._qkv = self._out = self._mlp_residual = None
            return self
        kw.setdefault("dynamic", True)
        self._qkv, self._out = torch.compile(self.qkv, **kw), torch.compile(self.out, **kw)
        self._mlp_residual = torch.compile(self.mlp_residual, **kw)  # what a tiled out runs per tile
        return self


def token_tiles(fn, x, tile: int):
    """fn(x) for a token-wise fn (each output token depends on its own input token only), `tile` tokens at a
    time: x (B, T, H) is cut into (tile, H) pieces along its B*T tokens. With autograd on, each piece runs under
    its own checkpoint, so fn's intermediates exist for one tile at a time, in forward and in backward (which
    recomputes them tile by tile); what stays is x itself and the output. Same values as fn(x), up to matmul
    blocking (tests/test_checkpointing.py pins loss and gradients)."""
    B, T, H = x.shape
    pieces = x.reshape(B * T, H).split(tile)
    if torch.is_grad_enabled():
        out = [checkpoint(fn, p, use_reentrant=False) for p in pieces]
    else:
        out = [fn(p) for p in pieces]
    return torch.cat(out).view(B, T, -1)


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def build_mask(T, segment_ids=None, attention_mask=None, past=0, device=None):
    """Boolean SDPA mask (B, 1, T, past+T), True = may attend; None when plain causal suffices.

    segment_ids (B, T): packed rows; a token sees only earlier tokens of its own sample. With a cached prefix
    (past > 0) every sample also sees the whole prefix: several continuations of one prompt, packed in one row
    (model.channel.channel_score_matrix).
    attention_mask (B, past+T): 0 marks left padding in batched generation.
    """
    if segment_ids is None and attention_mask is None and past == 0:
        return None  # is_causal lets SDPA pick its fused kernels
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if segment_ids is not None:
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # (B, 1, T, T)
        if past:  # every segment also sees the whole prefix
            same = torch.cat([torch.ones(*same.shape[:3], past, dtype=torch.bool, device=same.device), same], -1)
        mask = mask & same
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
        # A left-pad query would otherwise see no key at all (softmax of nothing = NaN): let it see itself.
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = rope_inv_freq(cfg)  # plain attribute, not a buffer: never in the state dict, never on meta
        self.gradient_checkpointing = False
        self.offload = False
        self.source = None  # where the weights came from (load_model), named in adapter configs
        self.lora_config = None  # the LoRA settings once apply_lora / load_adapter has run (model/lora.py)

    # False sends packed rows through the (B, 1, T, T) mask instead of per-segment SDPA (tests, benchmarks)
    segment_attention = True

    def set_compiled(self, enabled: bool = True, **kw):
        """Block.set_compiled on every decoder block (TrainConfig.compile)."""
        for block in self.model.layers:
            block.set_compiled(enabled, **kw)
        return self

    def set_mlp_tile(self, tokens: int = 0):
        """Run every block's post-attention norm + MLP `tokens` tokens at a time, each tile under its own
        checkpoint (token_tiles): the MLP's [tokens, intermediate] tensors and its backward's temporaries then
        exist for one tile, not the whole batch. Costs one more MLP forward per step. 0 turns it off."""
        assert tokens >= 0, tokens
        for block in self.model.layers:
            block.mlp_tile = tokens
        return self

    def set_gradient_checkpointing(self, enabled: bool = True, offload: bool = False):
        """Recompute each block in backward (non-reentrant: works under DDP and with frozen inputs).
        offload=True also parks each checkpointed block input on the CPU until its recompute."""
        self.gradient_checkpointing, self.offload = enabled, offload

    def rope(self, position_ids, dtype):
        inv = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * inv  # (B, T, hd/2), fp32 for long positions
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def attention_input(self, T, segment_ids, attention_mask, past, cached, device):
        """What every Attention call gets, by attention_path's rule: Segments for packed rows on the segment
        path, else build_mask's boolean mask, or None for plain causal rows."""
        cfg = self.config
        n_heads, n_kv, packed = cfg.num_attention_heads, cfg.num_key_value_heads, segment_ids is not None
        masked = attention_mask is not None or cached or not self.segment_attention
        if attention_path(n_heads, n_kv, device, packed=packed, masked=masked).segmented:
            runs = segment_runs(segment_ids)
            if runs is not None:
                # rows that are one example each need no splitting: one batched causal call
                return None if all(n == T for n in runs.lengths) else runs
        return build_mask(T, segment_ids, attention_mask, past, device)

    def hidden(self, input_ids, *, position_ids=None, segment_ids=None, attention_mask=None, cache=None):
        """Final-normed hidden states (B, T, H); the training loss applies lm_head only where labels exist."""
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        mask = self.attention_input(T, segment_ids, attention_mask, past, cache is not None, input_ids.device)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for layer in self.model.layers:
            if ckpt and self.offload:
                # Only the CPU copy of the block input stays alive; it comes back to the device at recompute.
                dev = x.device
                x = checkpoint(lambda xc, c, s, m, _l=layer: _l(xc.to(dev, non_blocking=True), c, s, m),
                               x.to("cpu"), cos, sin, mask, use_reentrant=False)
            elif ckpt:
                # Saves only the block input (B, T, H) per layer; everything inside is recomputed in backward.
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)

    def forward(self, input_ids, **kw):
        return self.lm_head(self.hidden(input_ids, **kw)).float()  # (B, T, vocab)
