"""The memory ledger's arithmetic: where every byte of a QLoRA training step goes, predicted from shapes alone
(no tensor is allocated here; engine/memory.py measures beside it and holds the CLI).

The prediction mirrors the code, not a rule of thumb: `block_saved` lists, tensor by tensor, what autograd
keeps for one decoder block of model/llama.py with model/quant.py's Linear4bit (it saves only its input, never
the dequantised weight) and model/lora.py's adapters (their input and the rank-r intermediate), and
tests/test_memory.py checks that list against saved-tensor hooks on a real forward. Compiled blocks (--compile)
save the same tensors (model.quant.nf4_linear keeps the dequantised weights out of the compiled graph) and run
their norm and SwiGLU backwards as fused kernels without the eager ones' fp32 temporaries. The attention and
dequantisation paths are the model's own rules (model.llama.attention_path, model.quant.dequant_path).
Parameter and buffer bytes are exact (same formulas as the Linear4bit buffers). The backward working set and
the CUDA context/allocator slack are stated assumptions; `--measure` on a GPU shows how far off they are.

Memory on a GPU, as torch.cuda.max_memory_allocated sees it:
  static     quantized weights + high-precision weights + LoRA params + their grads + optimizer state
  saved      what autograd keeps between forward and backward (checkpointing: one [B, T, H] per block)
  transient  the largest short-lived working set: a recomputed block and its gradients, or a loss chunk
peak = static + saved + max(transients). nvidia-smi additionally shows the CUDA context and the caching
allocator's reserve (reserved - allocated), listed below the peak.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

import torch

from engine.config import TrainConfig
from engine.loss import LOSS_CHUNK
from engine.precision import dtype_of
from model.llama import BACKWARD_CHUNK, AttentionPath, attention_path
from model.lora import TARGETS
from model.quant import Linear4bit, dequant_path

GiB = 1024 ** 3
MiB = 1024 ** 2

# Assumptions that cannot be derived from shapes (state them, measure them with --measure on a GPU).
CUDA_CONTEXT_BYTES = 400 * MiB  # CUDA 12 context + cuBLAS workspace with lazy module loading; outside the allocator
ALLOCATOR_SLACK = 0.10  # reserved ≈ 1.10 × peak allocated for a steady training loop (block sizes, fragmentation)
TILE_HINT = 4096  # the MLP tile the table compares with (--mlp-tile), for micro-batches longer than it


# ------------------------------------------------------------------------------------------------- the setup
@dataclass
class Setup:
    """The knobs the ledger needs, named as in TrainConfig; `from_config` builds it from a run's config."""
    seq_len: int
    batch_size: int
    lora_r: int = 16
    lora_targets: tuple = TARGETS
    lora_dropout: float = 0.0  # > 0: each adapter keeps its own dropped copy of its input and a mask (block_saved)
    checkpointing: bool = True
    offload: bool = False
    mlp_tile: int = 0  # tokens per MLP tile (model.llama.token_tiles); 0 = the whole micro-batch at once
    trim_cpu_heap: bool = True  # engine.step.trim_cpu_heap on the CPU (process RSS only: no tensor byte changes)
    compile: bool = False  # Block.set_compiled: norm and SwiGLU backwards fused, no fp32 temporaries (tiled: the
    # MLP tiles only; the rest of the block then runs eagerly)
    precision: str = "bf16"  # resolved: compute dtype (autocast) and dtype of the high-precision base weights
    optimizer: str = "adamw"
    quantize: str = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    loss_chunk: int = LOSS_CHUNK
    supervised: int | None = None  # supervised positions per micro-batch; None = worst case B*(T-1)
    pack: bool = False  # packed rows: one is_causal SDPA call per segment (model.llama.attention_path's rule)
    pack_mask: bool = False  # packed rows forced onto the (B, 1, T, T) boolean mask (Llama.segment_attention=False)
    sdpa: str = "auto"  # auto | flash | efficient | math: the SDPA kernel (auto: model.llama.attention_path's)
    device: str = "cuda"
    capability: tuple | None = None  # the CUDA compute capability predicted for, e.g. (7, 5) for a T4; None: the
    # visible GPU's, or sm 80 (model.llama.attention_path)

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, precision: str, device: str, model=None, **kw) -> "Setup":
        """The ledger's view of a run: cfg's knobs, `precision` already resolved (engine.precision). With a
        built `model`, quantization and LoRA settings are read off it, so the ledger describes what was built.
        kw: supervised, sdpa."""
        s = cls(seq_len=cfg.seq_len, batch_size=cfg.batch_size, lora_r=cfg.lora_r,
                lora_targets=tuple(cfg.lora_targets), lora_dropout=cfg.lora_dropout,
                checkpointing=cfg.checkpointing, offload=cfg.offload,
                mlp_tile=cfg.mlp_tile, compile=cfg.compile, precision=precision, optimizer=cfg.optimizer,
                quantize=cfg.quantize, double_quant=cfg.double_quant, loss_chunk=cfg.loss_chunk, pack=cfg.pack,
                device=device, **kw)
        return s if model is None else dataclasses.replace(s, **built_settings(model))

    def to_config(self) -> TrainConfig:
        """A TrainConfig with these knobs, for building and stepping the model the trainer would (LoRA alpha
        2r: the scaling changes no byte; the dropout does, so it is passed on)."""
        return TrainConfig(seq_len=self.seq_len, batch_size=self.batch_size, lora_r=self.lora_r,
                           lora_alpha=2.0 * self.lora_r, lora_targets=list(self.lora_targets),
                           lora_dropout=self.lora_dropout,
                           checkpointing=self.checkpointing, offload=self.offload, mlp_tile=self.mlp_tile,
                           trim_cpu_heap=self.trim_cpu_heap, compile=self.compile, precision=self.precision,
                           optimizer=self.optimizer, quantize=self.quantize, double_quant=self.double_quant,
                           loss_chunk=self.loss_chunk, pack=self.pack)

    @property
    def cbytes(self) -> int:
        return torch.finfo(dtype_of(self.precision)).bits // 8

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def tiled(self) -> bool:
        """Whether the MLP runs in tiles (model.llama.Block.out: only when the micro-batch has more tokens)."""
        return 0 < self.mlp_tile < self.tokens

    @property
    def mlp_tokens(self) -> int:
        """Tokens the MLP works on at once: one tile, or the whole micro-batch."""
        return self.mlp_tile if self.tiled else self.tokens

    @property
    def rows(self) -> int:
        """Supervised positions per micro-batch: at most B*(T-1) (the last position of a row predicts nothing)."""
        most = self.batch_size * (self.seq_len - 1)
        return most if self.supervised is None else max(0, min(self.supervised, most))

    @property
    def dropout(self) -> bool:
        """Whether the adapters run dropout on their input (model.lora.LoRALinear: nn.Dropout only when p > 0)."""
        return self.lora_dropout > 0 and self.lora_r > 0

    @property
    def offloaded(self) -> bool:
        """Whether the checkpointed block inputs really leave the device: on the CPU, Llama.hidden's x.to("cpu") is
        the tensor itself (no copy), so --offload there changes no byte."""
        return self.offload and self.checkpointing and self.device != "cpu"


@dataclass
class Row:
    group: str  # static | saved | transient | outside
    name: str
    bytes: int
    note: str = ""
    where: str = "device"  # device | host | none (the other checkpointing choice: shown, never added up)


@dataclass
class Ledger:
    rows: list[Row] = field(default_factory=list)
    peak: int = 0
    peak_other: int = 0  # peak with the other checkpointing choice, for comparison
    peak_tiled: int = 0  # peak with MLP tiles of TILE_HINT tokens, shown when the run has none and is longer
    transient_name: str = ""

    def add(self, *a, **kw):
        self.rows.append(Row(*a, **kw))

    def total(self, group: str, where: str = "device") -> int:
        return sum(r.bytes for r in self.rows if r.group == group and r.where == where)

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "predicted_peak_bytes": self.peak,
                "predicted_peak_other_bytes": self.peak_other, "predicted_peak_tiled_bytes": self.peak_tiled or None,
                "transient": self.transient_name}


# ------------------------------------------------------------------------------------------ static bytes
def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """projection name -> (out_features, in_features) for one decoder block."""
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q),
            "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}


def nf4_bytes(out_f: int, in_f: int, blocksize: int = 64, double_quant: bool = False) -> tuple[int, int]:
    """(packed bytes, quant-state bytes) of one model.quant.Linear4bit: packed uint8 numel/2; absmax float32 per
    block, or with double quantisation uint8 per block + float32 per 256 blocks + a float32 offset."""
    n = out_f * in_f
    blocks = n // blocksize
    state = blocks + 4 * math.ceil(blocks / 256) + 4 if double_quant else 4 * blocks
    return n // 2, state


def static_rows(cfg, s: Setup, led: Ledger):
    L, H, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    c = s.cbytes
    shapes = linear_shapes(cfg)
    if s.quantize == "nf4":
        packed = state = 0
        for o, i in shapes.values():
            p, q = nf4_bytes(o, i, s.blocksize, s.double_quant)
            packed, state = packed + p, state + q
        led.add("static", "quantized weights: packed NF4", L * packed, f"{L}×7 projections, 0.5 byte/weight")
        led.add("static", "quantized weights: quant state", L * state,
                "absmax uint8 + fp32/256 (double quant)" if s.double_quant else "absmax fp32 per 64 weights")
    else:
        n = sum(o * i for o, i in shapes.values())
        led.add("static", "projection weights (not quantized)", L * n * c, f"{s.precision}")
    emb = V * H * c
    led.add("static", "embeddings" + (" (tied lm_head)" if cfg.tie_word_embeddings else ""), emb,
            f"{V}×{H} {s.precision}")
    if not cfg.tie_word_embeddings:
        led.add("static", "lm_head", emb, f"{V}×{H} {s.precision}")
    led.add("static", "norms", (2 * L + 1) * H * c, f"{2 * L + 1}×{H} {s.precision}")
    n_lora = lora_params(cfg, s)
    led.add("static", "LoRA parameters", 4 * n_lora, f"{n_lora:,} fp32 master weights, r={s.lora_r}")
    led.add("static", "LoRA gradients", 4 * n_lora, "fp32, alive through backward and the step")
    led.add("static", "optimizer state", optimizer_bytes(cfg, s), optimizer_note(s))


def lora_params(cfg, s: Setup) -> int:
    if s.lora_r <= 0:
        return 0
    shapes = linear_shapes(cfg)
    return cfg.num_hidden_layers * sum(s.lora_r * (o + i) for t, (o, i) in shapes.items() if t in s.lora_targets)


def optimizer_bytes(cfg, s: Setup) -> int:
    if s.optimizer == "adamw":
        # torch AdamW: exp_avg + exp_avg_sq in fp32 per weight, and a 4-byte fp32 `step` per tensor (A and B)
        n_tensors = 2 * cfg.num_hidden_layers * len(set(s.lora_targets)) if s.lora_r > 0 else 0
        return 8 * lora_params(cfg, s) + 4 * n_tensors
    # bitsandbytes PagedAdamW8bit: two uint8 states + one fp32 absmax per 256 values each, for tensors of at
    # least 4096 values (smaller ones stay 32-bit). Paged: under memory pressure the driver may evict it to host.
    total = 0
    shapes = linear_shapes(cfg)
    for t, (o, i) in shapes.items():
        if t not in s.lora_targets:
            continue
        for n in (s.lora_r * i, s.lora_r * o):
            total += 2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 8 * n
    return cfg.num_hidden_layers * total


def optimizer_note(s: Setup) -> str:
    return ("AdamW: 2 fp32 moments per LoRA weight" if s.optimizer == "adamw"
            else "paged AdamW 8-bit: 2 uint8 moments + fp32 absmax/256 (paged: may spill to host)")


def attention(cfg, s: Setup) -> AttentionPath:
    """The SDPA path model/llama.py's Attention takes for these shapes (packed rows: per segment, or the mask
    when forced), with the kernel replaced by --sdpa when one is forced. On the CPU k/v stay on their n_kv heads
    with the mask too where this torch's flash kernel takes them so (model.llama.cpu_flash_takes_grouped_kv,
    probed in this process; torch 2.13: tests/test_cpu_gqa_mask.py measures the backward it predicts)."""
    path = attention_path(cfg.num_attention_heads, cfg.num_key_value_heads, s.device, packed=s.pack,
                          masked=s.pack and s.pack_mask, capability=s.capability if s.device == "cuda" else None)
    return path if s.sdpa == "auto" else dataclasses.replace(path, kernel=s.sdpa)


def block_saved(cfg, s: Setup) -> list[tuple[str, int]]:
    """What autograd keeps for one decoder block (model/llama.py Block) without checkpointing, tensor by tensor.
    n = B*T tokens, c = compute dtype bytes. Frozen Linear4bit/nn.Linear save no input (no weight gradient);
    LoRA's A saves its input, B its rank-r input; SwiGLU (_SiluMul) keeps gate and up. With LoRA dropout each
    adapter's A saves its own dropped copy of the input, and the dropout its mask (lora_dropout_rows), instead of
    the one input the adapters of q/k/v (or gate/up) share.
    (The first block's input_layernorm saves nothing: its input, the frozen embedding, needs no gradient.)"""
    n, c, H = s.tokens, s.cbytes, cfg.hidden_size
    nh, nkv, hd, r = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, s.lora_r
    B, T_ = s.batch_size, s.seq_len
    T = set(s.lora_targets) if r > 0 else set()
    path = attention(cfg, s)
    kernel, expanded = path.kernel, path.expand_kv
    out = [
        ("input_layernorm: input (the block input)", n * H * c),  # model/llama.py _RMSNormFn keeps x as it is
        ("input_layernorm: rsqrt", n * 4),
        ("q after RoPE", n * nh * hd * c),
        ("k after RoPE" + (", copied to all heads" if expanded else ""), n * (nh if expanded else nkv) * hd * c),
        ("v" + (", copied to all heads" if expanded else ""), n * (nh if expanded else nkv) * hd * c),
        ("SDPA output", n * nh * hd * c),
    ]
    if kernel == "math":
        # scores, softmax, dropout-free: the softmax output (B, nh, T, T) is kept for both matmuls' backward;
        # GQA's k and v are expanded to all heads first (copies)
        out.append(("SDPA math kernel: attention probabilities", B * nh * T_ * T_ * c))
        if nkv != nh:
            out.append(("SDPA math kernel: k, v expanded to all heads", 2 * n * nh * hd * c))
    else:
        out.append(("SDPA logsumexp (fp32)", n * nh * 4))
    if kernel != "math" and path.masked:
        # SDPA turns the boolean mask into an additive one per call; the fused kernel keeps it for backward
        out.append(("SDPA additive mask (packed rows)", B * T_ * T_ * c))
    if s.tiled:  # token_tiles: each tile's checkpoint keeps its slice of the input, nothing else
        out.append((f"post_attention_layernorm: input (MLP tiles of {s.mlp_tile} tokens keep only it)", n * H * c))
    else:
        out += mlp_saved(cfg, s, n)
    if s.dropout:  # the adapters' inputs are their dropped copies; the norm and attention outputs are not kept
        out += lora_dropout_rows(s, T & QKV, "q/k/v", "attention norm output", n * H, "attention")
        out += lora_dropout_rows(s, T & {"o_proj"}, "o_proj", "attention output", n * nh * hd, "attention")
    elif T & QKV:
        out.append(("LoRA input: attention norm output", n * H * c))
    if "o_proj" in T and not s.dropout and (kernel == "math" or path.segmented):
        # fused kernels return (B, T, heads, hd)-contiguous output: the transpose+reshape is then a view of it;
        # the segment path concatenates its per-segment outputs, a new tensor
        out.append(("LoRA input: attention output", n * nh * hd * c))
    A = T & ATTENTION  # the MLP adapters' are in mlp_saved (or, tiled, inside the tiles)
    if A:
        out.append((f"LoRA rank-{r} intermediates ×{len(A)}", len(A) * n * r * c))
        if c != 4:  # the fp32 master weights are cast to the compute dtype for the matmul, and that copy is kept
            out.append(("LoRA weights cast to compute dtype", lora_cast_bytes(cfg, s, A)))
    return out


QKV = {"q_proj", "k_proj", "v_proj"}
ATTENTION = QKV | {"o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}


def dropout_mask_bytes(s: Setup, part: str) -> int:
    """Bytes per element of the mask LoRA's dropout (nn.Dropout, training) keeps for backward, for the adapters of
    `part` ("attention": q/k/v and o_proj; "mlp": gate/up/down): CUDA's fused kernel (aten.native_dropout) keeps a
    bool mask, and so does compiled code (inductor's dropout, measured on the CPU); the CPU's eager dropout
    multiplies by a noise tensor in the input's dtype and keeps that (checked with saved-tensor hooks in
    tests/test_ledger_dropout.py). What runs compiled is model.llama.Block's rule: the whole block, or with MLP
    tiles only the tiles' norm + MLP (qkv and o_proj then run eagerly)."""
    assert part in ("attention", "mlp"), part
    compiled = s.compile and (part == "mlp" or not s.tiled)
    return 1 if s.device == "cuda" or compiled else s.cbytes


def lora_dropout_rows(s: Setup, targets, which: str, what: str, elems: int, part: str) -> list[tuple[str, int]]:
    """The saved rows of adapters with dropout on the same input of `elems` elements: each keeps a dropped copy
    (lora_A's matmul saves it for its weight gradient) and the dropout's mask (dropout_mask_bytes for `part`)."""
    if not targets:
        return []
    k = len(targets)
    return [(f"LoRA dropout {which}: dropped {what}" + (f" ×{k}" if k > 1 else ""), k * elems * s.cbytes),
            (f"LoRA dropout {which}: mask" + (f" ×{k}" if k > 1 else ""), k * elems * dropout_mask_bytes(s, part))]


def lora_cast_bytes(cfg, s: Setup, targets) -> int:
    shapes = linear_shapes(cfg)
    return sum(s.lora_r * (o + i) for t, (o, i) in shapes.items() if t in targets) * s.cbytes


def mlp_saved(cfg, s: Setup, n: int) -> list[tuple[str, int]]:
    """What the post-attention norm and the MLP keep for backward over n tokens (the whole micro-batch, or one
    tile when it is recomputed tile by tile)."""
    c, H, I, r = s.cbytes, cfg.hidden_size, cfg.intermediate_size, s.lora_r
    T = set(s.lora_targets) & MLP if r > 0 else set()
    out = [("post_attention_layernorm: input", n * H * c),
           ("post_attention_layernorm: rsqrt", n * 4),
           ("gate_proj output", n * I * c),
           ("up_proj output", n * I * c)]  # _SiluMul keeps gate and up only, not silu(gate)
    if s.dropout:  # each adapter's own dropped input and mask; the norm output and silu(gate)*up are not kept
        out += lora_dropout_rows(s, T & {"gate_proj", "up_proj"}, "gate/up", "MLP norm output", n * H, "mlp")
        out += lora_dropout_rows(s, T & {"down_proj"}, "down_proj", "silu(gate)*up", n * I, "mlp")
    else:
        if T & {"gate_proj", "up_proj"}:
            out.append(("LoRA input: MLP norm output", n * H * c))
        if "down_proj" in T:
            out.append(("LoRA input: silu(gate)*up", n * I * c))
    if T:
        out.append((f"MLP LoRA rank-{r} intermediates ×{len(T)}", len(T) * n * r * c))
        if c != 4:
            out.append(("MLP LoRA weights cast to compute dtype", lora_cast_bytes(cfg, s, T)))
    return out


def first_block_discount(cfg, s: Setup) -> int:
    """Bytes the first block saves less than the others: its input (the frozen embedding) needs no gradient, so
    input_layernorm saves nothing, and neither do the q/k/v adapters' A matmuls their weight copies, nor their
    dropouts a mask (their dropped copies are kept: A's weight gradient needs them)."""
    qkv = [t for t in ("q_proj", "k_proj", "v_proj") if t in s.lora_targets] if s.lora_r > 0 else []
    casts = len(qkv) * s.lora_r * cfg.hidden_size * s.cbytes if s.cbytes != 4 else 0
    masks = len(qkv) * s.tokens * cfg.hidden_size * dropout_mask_bytes(s, "attention") if s.dropout else 0
    return s.tokens * cfg.hidden_size * s.cbytes + s.tokens * 4 + casts + masks


def model_saved(cfg, s: Setup) -> list[tuple[str, int]]:
    """Saved tensors shared by all blocks or outside them (kept whether or not blocks are checkpointed)."""
    n, c, H, hd = s.tokens, s.cbytes, cfg.hidden_size, cfg.head_dim
    out = [("RoPE cos and sin", 2 * n * hd * c)]
    if attention(cfg, s).masked and s.checkpointing:  # a checkpoint input; else only the per-block copies stay
        out.append(("attention mask (bool, packed rows)", s.batch_size * s.seq_len * s.seq_len))
    out += [("final norm: input + rsqrt", n * H * c + n * 4),
            ("supervised hidden rows (loss input)", s.rows * H * c),
            ("label mask, targets, log-sum-exp", s.batch_size * (s.seq_len - 1) + 8 * s.rows + 4 * s.rows)]
    return out


def swiglu_backward_temporaries(cfg, s: Setup) -> int:
    """model.llama._SiluMul's backward upcasts to fp32 BACKWARD_CHUNK elements at a time: at most three fp32
    chunk-sized tensors (gate, sigmoid, silu or d silu) and one compute-dtype copy alive at once; in fp32 the upcast
    is the tensor itself, so two. Compiled blocks (--compile) compute it in one fused kernel: none (measured on
    the CPU's inductor kernels, tests/test_memory.py)."""
    if s.compile:
        return 0
    I = cfg.intermediate_size
    elems = min(s.mlp_tokens * I, max(1, BACKWARD_CHUNK // I) * I)
    return elems * (8 if s.cbytes == 4 else 12 + s.cbytes)


def norm_backward_temporaries(cfg, s: Setup, tokens: int, block: bool = True) -> int:
    """model.llama._RMSNormFn's backward over `tokens` rows: three fp32 chunk-sized tensors at once (x̂, the
    gradient of x̂, one product), BACKWARD_CHUNK elements at a time; the same in fp32. A block's input norm
    compiled (--compile, rows no longer than --mlp-tile) is one fused kernel: none; with MLP tiles it runs eagerly
    (model.llama.Block.forward), and so does the final norm (block=False)."""
    if s.compile and block and not s.tiled:
        return 0
    H = cfg.hidden_size
    return min(tokens * H, max(1, BACKWARD_CHUNK // H) * H) * 12


def block_backward_working(cfg, s: Setup) -> int:
    """Gradients and temporaries alive while one block runs backward, at its largest moment. Usually that is the
    SwiGLU backward: the gradient coming in and the two going out (3 × t·I over the t tokens the MLP works on),
    the fp32 temporaries of swiglu_backward_temporaries, and the block output's gradient (n·H), in compute
    dtype; by then down_proj's backward has freed its LoRA input (silu(gate)·up, t·I), which the recompute
    counted (with LoRA dropout: its dropped copy and mask). The other candidate is down_proj's backward itself:
    its dequantised weight beside its input gradient (t·I) and the block output's gradient. Tiled (token_tiles),
    the tile's own recompute comes on top, and the input gradients of the tiles done so far (up to n·H). Checked
    against the CPU allocator at small shapes by tests/test_memory.py (engine.memory.peak_allocated_bytes)."""
    n, t, c, H, I = s.tokens, s.mlp_tokens, s.cbytes, cfg.hidden_size, cfg.intermediate_size
    # with dropout, down_proj's adapter keeps its dropped copy and mask instead (mlp_saved): both freed by then in
    # eager blocks; a compiled block's backward still holds the mask (measured on the CPU, tests/test_ledger_dropout)
    mask = dropout_mask_bytes(s, "mlp") if s.dropout and not s.compile else 0
    freed = t * I * (c + mask) if "down_proj" in s.lora_targets and s.lora_r > 0 else 0
    swiglu = 3 * t * I * c + swiglu_backward_temporaries(cfg, s) - freed
    down = t * I * c + dequant_transient(cfg, s)
    work = max(swiglu, down) + n * H * c
    if s.tiled:
        tile = sum(b for _, b in mlp_saved(cfg, s, t)) - t * H * c  # its input is a slice of the block's
        work += tile + n * H * c
    # the block's last moment, input_layernorm's backward: its recompute gone, the residual gradient, the norm's
    # output gradient and its input gradient (3 × n·H) and the norm's fp32 temporaries
    recompute = sum(b for _, b in block_saved(cfg, s)) - n * H * c
    norm = -recompute + 3 * n * H * c + norm_backward_temporaries(cfg, s, n)
    return max(work, attention_backward_working(cfg, s), norm)


def attention_backward_working(cfg, s: Setup) -> int:
    """The block's other large moment, SDPA's backward (the largest when the MLP is tiled or small): the MLP's
    saved tensors are gone by then (this is relative to a block holding them, so they count negative); the
    residual gradient and the gradient of the SDPA output (2 × n·H), dq, dk, dv in compute dtype (k and v as
    attention_path feeds them) and, on CUDA, an fp32 dq accumulator (n·heads·hd·4: FlashAttention-2 and the
    memory-efficient kernel accumulate dq in fp32). PyTorch's CPU flash backward, given q, k, v and the
    output's gradient in the layout Attention gives them ((B, T, heads, hd) memory seen as (B, heads, T, hd)),
    holds nothing more that grows with the tokens: per-thread buffers of 2-3.3 MiB (2 threads), not counted
    (measured; tests/test_memory.py). Given an output gradient in contiguous (B, heads, T, hd) layout it would
    hold one more dq-sized tensor in the compute dtype, so the test feeds it the model's layout."""
    n, c, H = s.tokens, s.cbytes, cfg.hidden_size
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kv = nh if attention(cfg, s).expand_kv else nkv
    mlp = n * H * c if s.tiled else sum(b for _, b in mlp_saved(cfg, s, n))
    # with LoRA dropout o_proj's adapter kept its own dropped input and mask: its backward, done by then, freed them
    o_drop = n * nh * hd * (c + dropout_mask_bytes(s, "attention")) if s.dropout and "o_proj" in s.lora_targets else 0
    return -mlp - o_drop + 2 * n * H * c + n * (nh + 2 * kv) * hd * c + n * nh * hd * sdpa_dq_buffer_bytes(s)


def sdpa_dq_buffer_bytes(s: Setup) -> int:
    """Bytes per query element of SDPA's backward beyond dq, dk and dv (attention_backward_working)."""
    return 4 if s.device == "cuda" else 0


LOSS_SAVED = ("supervised hidden rows", "label mask")  # model_saved rows the loss keeps


def saved_bytes(cfg, s: Setup, prefixes: tuple) -> int:
    """model_saved bytes of the rows named with these prefixes."""
    return sum(b for name, b in model_saved(cfg, s) if name.startswith(prefixes))


def freed_before_blocks(cfg, s: Setup) -> int:
    """Saved bytes gone by the time the blocks run backward: the loss's and the final norm's (model_saved)."""
    return saved_bytes(cfg, s, LOSS_SAVED + ("final norm",))


def dequant_transient(cfg, s: Setup) -> int:
    """The largest dequantisation working set (one weight at a time: Linear4bit frees it after its matmul), as
    model.quant.dequant_path states it for this device, dtype and shape."""
    if s.quantize != "nf4":
        return 0
    return max(dequant_path(oi, s.blocksize, s.device, dtype_of(s.precision), s.double_quant).transient_bytes
               for oi in linear_shapes(cfg).values())


def loss_transient(cfg, s: Setup) -> int:
    """engine/loss.py's LinearCrossEntropy holds one chunk's logits at a time, in fp32 (4 bytes each), plus,
    under bf16/fp16, the compute-dtype matmul output (forward, backward) or the compute-dtype gradient (backward)
    beside it: 4 + c bytes per logit (4 in fp32)."""
    rows = min(s.loss_chunk, s.rows)
    return rows * cfg.vocab_size * (4 + (s.cbytes if s.cbytes != 4 else 0))


def predict(cfg, s: Setup) -> Ledger:
    """The ledger for s, with the two comparison peaks: the other checkpointing choice, predicted as that setup
    itself (so the line says what `--checkpointing`/`--no-checkpointing` would print), and MLP tiles of
    TILE_HINT tokens when the run has none and is longer."""
    led = _predict(cfg, s)
    led.peak_other = _predict(cfg, other_checkpointing(s)).peak
    if not s.tiled and s.tokens > TILE_HINT:
        led.peak_tiled = _predict(cfg, dataclasses.replace(s, mlp_tile=TILE_HINT)).peak
    return led


def other_checkpointing(s: Setup) -> Setup:
    """s with the other checkpointing choice (offload needs checkpointing: off with it)."""
    return dataclasses.replace(s, checkpointing=not s.checkpointing, offload=s.offload and not s.checkpointing)


def _predict(cfg, s: Setup) -> Ledger:
    """predict's rows and peak, without its comparison peaks."""
    led = Ledger()
    static_rows(cfg, s, led)
    L, n, c, H = cfg.num_hidden_layers, s.tokens, s.cbytes, cfg.hidden_size
    per_block = block_saved(cfg, s)
    full_block = sum(b for _, b in per_block)
    first = first_block_discount(cfg, s)
    for name, b in model_saved(cfg, s):
        led.add("saved", name, b)
    ckpt_in = L * n * H * c
    if s.checkpointing:
        where = (" → host (offload)" if s.offloaded else
                 " (offload on the CPU: the host is the device, nothing moves)" if s.offload else "")
        led.add("saved", "block inputs (checkpointing)", 0 if s.offloaded else ckpt_in,
                f"{L}×[{s.batch_size},{s.seq_len},{H}] {s.precision}" + where)
        if s.offloaded:
            led.add("saved", "block inputs on host (offload)", ckpt_in, "CPU RAM, not GPU", where="host")
        led.add("saved", "(without checkpointing it would be)", L * full_block - first, f"{L}×{fmt(full_block)}, "
                "first block less", where="none")
    else:
        led.add("saved", f"all blocks' saved tensors ({L}×{fmt(full_block)})", L * full_block - first,
                "see block_saved(): norm inputs, q/k/v, SDPA out, gate and up [n, I], LoRA inputs")
        led.add("saved", "(with checkpointing it would be)", ckpt_in, "block inputs", where="none")
    # transients: the largest one bounds the peak (they do not overlap: loss backward finishes before blocks)
    recompute = (full_block - n * H * c) if s.checkpointing else 0  # the norm's saved input is the block input
    offload_back = n * H * c if s.offloaded else 0  # the block input brought back for its recompute
    working, freed = block_backward_working(cfg, s), freed_before_blocks(cfg, s)
    block_t = recompute + offload_back + working - freed
    loss_t = loss_transient(cfg, s) + s.rows * H * c  # plus the gradient of the supervised hidden rows
    led.add("transient", "block backward" + (" (recomputed block + grads)" if s.checkpointing else " (grads)"),
            block_t, f"{'recompute ' + fmt(recompute) + ' + ' if s.checkpointing else ''}"
            f"{'block input back ' + fmt(offload_back) + ' + ' if offload_back else ''}working set {fmt(working)}"
            f"{' (MLP tiles of ' + str(s.mlp_tile) + ' tokens)' if s.tiled else ''} − {fmt(freed)} of saved "
            "loss/final-norm tensors freed by then")
    led.add("transient", f"loss chunk ({min(s.loss_chunk, s.rows)} tokens × {cfg.vocab_size} vocab)", loss_t,
            "fp32 logits, turned into their gradient in place" + ("" if s.cbytes == 4 else f" + a {s.precision} copy"))
    final_tmp = norm_backward_temporaries(cfg, s, n, block=False)
    norm_t = 2 * n * H * c + final_tmp - saved_bytes(cfg, s, LOSS_SAVED)
    led.add("transient", "final norm backward", norm_t, f"gradient in and out (2 × n·H {s.precision}) + fp32 "
            f"temporaries {fmt(final_tmp)}, the loss's saved rows freed")
    static = led.total("static")
    saved = led.total("saved")
    transients = {"block backward": block_t, "loss chunk": loss_t, "final norm backward": norm_t}
    led.transient_name = max(transients, key=transients.get)
    led.peak = static + saved + transients[led.transient_name]
    if s.device == "cuda":
        led.add("outside", "CUDA context (not in max_memory_allocated)", CUDA_CONTEXT_BYTES, "assumption")
        led.add("outside", "allocator slack (reserved − allocated)", int(ALLOCATOR_SLACK * led.peak),
                f"assumption: {ALLOCATOR_SLACK:.0%} of peak")
    return led


def fmt(b: int | float) -> str:
    if abs(b) >= GiB:
        return f"{b / GiB:.2f} GiB"
    if abs(b) >= MiB:
        return f"{b / MiB:.1f} MiB"
    if abs(b) >= 1024:
        return f"{b / 1024:.1f} KiB"
    return f"{int(b)} B"


def describe(cfg, s: Setup) -> str:
    return (f"L={cfg.num_hidden_layers} H={cfg.hidden_size} I={cfg.intermediate_size} heads={cfg.num_attention_heads}"
            f"/{cfg.num_key_value_heads} V={cfg.vocab_size} | B={s.batch_size} T={s.seq_len} {s.precision} "
            f"{s.quantize}{'+dq' if s.double_quant else ''} LoRA r={s.lora_r} on {len(s.lora_targets)} projections, "
            f"{'checkpointing' if s.checkpointing else 'no checkpointing'}{' + offload' if s.offload else ''}, "
            f"{f'LoRA dropout {s.lora_dropout:g}, ' if s.dropout else ''}"
            f"{'compiled blocks, ' if s.compile else ''}"
            f"{s.optimizer}, loss chunk {s.loss_chunk}, {s.rows} supervised tokens, "
            f"{attention_name(cfg, s)} attention, device {s.device}"
            + (f" sm {s.capability[0]}.{s.capability[1]}" if s.capability and s.device == "cuda" else ""))


def attention_name(cfg, s: Setup) -> str:
    path = attention(cfg, s)
    return "packed (mask)" if path.masked else "packed (per segment)" if path.segmented else "causal"


def format_table(led: Ledger, measured: dict | None = None, title: str = "") -> str:
    """The ledger as a text table; `measured` maps a row name (or 'peak allocated', ...) to bytes."""
    measured = measured or {}
    w = max(len(r.name) for r in led.rows) + 2
    lines = [title] if title else []
    lines.append(f"{'component':<{w}} {'predicted':>11} {'measured':>11}  note")
    group = None
    for r in led.rows:
        if r.group != group:
            group = r.group
            lines.append(f"-- {group}" + {"static": " (resident)", "saved": " (forward → backward)",
                                          "transient": " (largest one counts)",
                                          "outside": " (nvidia-smi only)"}[group])
        m = measured.get(r.name, measured.get(r.name.split(" (")[0]))  # "embeddings (tied lm_head)" -> "embeddings"
        # host RAM and the other checkpointing choice are shown beside the saved rows but never added up
        where = {"host": " [host] (not in total)", "none": " (not in total)"}.get(r.where, "")
        lines.append(f"{r.name:<{w}} {fmt(r.bytes):>11} {fmt(m) if m is not None else '':>11}  {r.note}{where}")
    lines.append("-" * (w + 40))
    for key, val in (("static", led.total("static")), ("saved", led.total("saved"))):
        m = measured.get(f"total {key}")
        lines.append(f"{'total ' + key:<{w}} {fmt(val):>11} {fmt(m) if m is not None else '':>11}")
    m = measured.get("peak allocated")
    lines.append(f"{'PREDICTED PEAK (allocated)':<{w}} {fmt(led.peak):>11} {fmt(m) if m is not None else '':>11}"
                 f"  static + saved + {led.transient_name}")
    if "peak reserved" in measured:
        lines.append(f"{'peak reserved':<{w}} {fmt(led.peak * (1 + ALLOCATOR_SLACK)):>11} "
                     f"{fmt(measured['peak reserved']):>11}")
    lines.append(f"{'peak with the other checkpointing choice':<{w}} {fmt(led.peak_other):>11}")
    if any(r.group == "outside" for r in led.rows):
        lines.append(f"{'peak as nvidia-smi would show it':<{w}} "
                     f"{fmt(led.peak + led.total('outside')):>11}")
    if led.peak_tiled:
        lines.append(f"{'peak allocated with --mlp-tile ' + str(TILE_HINT):<{w}} {fmt(led.peak_tiled):>11}  "
                     "the MLP a tile at a time (one more MLP forward per step)")
    return "\n".join(lines)


HIGH_PRECISION_ROWS = ("embeddings", "lm_head", "norms", "projection weights (not quantized)")


def predicted_module_bytes(led: Ledger) -> dict:
    """The ledger's static rows in module_bytes()'s keys."""
    get = {r.name: r.bytes for r in led.rows}
    hp = sum(b for k, b in get.items() if k.split(" (")[0] in HIGH_PRECISION_ROWS or k in HIGH_PRECISION_ROWS)
    return {"quantized weights: packed NF4": get.get("quantized weights: packed NF4", 0),
            "quantized weights: quant state": get.get("quantized weights: quant state", 0),
            "LoRA parameters": get["LoRA parameters"], "high-precision weights": hp}


def built_settings(model) -> dict:
    """Quantization and LoRA settings as built into `model` (Setup field -> value)."""
    quant = [m for m in model.modules() if isinstance(m, Linear4bit)]
    targets, r, p = set(), 0, 0.0
    for name, mod in model.named_modules():
        a = getattr(mod, "lora_A", None)
        if a is not None and hasattr(a, "weight"):
            targets.add(name.split(".")[-1])
            r = a.weight.shape[0]
            p = getattr(mod.lora_dropout, "p", 0.0)  # nn.Dropout(p), or nn.Identity when p is 0
    return dict(lora_r=r, lora_targets=tuple(sorted(targets)), lora_dropout=p, quantize="nf4" if quant else "none",
                double_quant=bool(quant and quant[0].double_quant), blocksize=quant[0].blocksize if quant else 64)
