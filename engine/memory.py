"""The memory ledger: where every byte of a QLoRA training step goes, predicted from shapes, measured beside it.

    python -m engine.memory --model llama-3.2-3b --seq-len 2048 --batch-size 2
    python -m engine.memory --model path/to/config.json --seq-len 32768 --batch-size 1 --offload
    python -m engine.memory --model smollm2-135m --seq-len 256 --batch-size 2 --measure   # runs real steps

The prediction mirrors the code, not a rule of thumb: `block_saved` lists, tensor by tensor, what autograd
keeps for one decoder block of model/llama.py with model/quant.py's Linear4bit (it saves only its input, never
the dequantised weight) and model/lora.py's adapters (their input and the rank-r intermediate), and
tests/test_memory.py checks that list against saved-tensor hooks on a real forward. Parameter and buffer
bytes are exact (same formulas as the Linear4bit buffers). The backward working set and the CUDA
context/allocator slack are stated assumptions; `--measure` on a GPU shows how far off they are.

Memory on a GPU, as torch.cuda.max_memory_allocated sees it:
  static     quantized weights + high-precision weights + LoRA params + their grads + optimizer state
  saved      what autograd keeps between forward and backward (checkpointing: one [B, T, H] per block)
  transient  the largest short-lived working set: a recomputed block and its gradients, or a loss chunk
peak = static + saved + max(transients). nvidia-smi additionally shows the CUDA context and the caching
allocator's reserve (reserved - allocated), listed below the peak.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from model.load import EMBEDDED

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GiB = 1024 ** 3
MiB = 1024 ** 2

# Shapes that need no download: FACTS.md (Llama 3.2 3B Instruct config.json; SmolLM2-135M GGUF metadata).
BUILTIN = {
    "llama-3.2-3b": dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)),
    EMBEDDED: dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
}

# Assumptions that cannot be derived from shapes (state them, measure them with --measure on a GPU).
CUDA_CONTEXT_BYTES = 400 * MiB  # CUDA 12 context + cuBLAS workspace with lazy module loading; outside the allocator
ALLOCATOR_SLACK = 0.10  # reserved ≈ 1.10 × peak allocated for a steady training loop (block sizes, fragmentation)


# ----------------------------------------------------------------------------------------------- config sources
def resolve_config(src: str):
    """--model SRC -> LlamaConfig without reading any weights.
    SRC: a built-in shape name, a config.json path, an HF directory, a .gguf file (metadata only) or a hub id
    (only config.json is downloaded)."""
    from model.config import LlamaConfig

    if src in BUILTIN:
        return LlamaConfig.from_hf_dict(BUILTIN[src])
    p = Path(src).expanduser()
    if p.suffix == ".json":
        return LlamaConfig.from_json(p)
    if p.is_dir():
        return LlamaConfig.from_json(p / "config.json")
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"{p}: GGUF file not found")
        from gguf import GGUFReader

        from model.load import gguf_metadata

        reader = GGUFReader(p)  # memory-maps the file; only the metadata is read
        cfg = LlamaConfig.from_gguf_fields(gguf_metadata(reader))
        cfg.tie_word_embeddings = "output.weight" not in {t.name for t in reader.tensors}
        return cfg
    if p.exists() or "/" not in src or src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{src}: not a config.json, model directory, .gguf file, hub id or one of "
                                f"{', '.join(BUILTIN)}")
    try:
        from huggingface_hub import hf_hub_download

        return LlamaConfig.from_json(hf_hub_download(src, "config.json"))
    except Exception as e:  # offline, gated, missing: huggingface_hub raises many types
        raise OSError(f"{src}: could not download config.json from the Hugging Face Hub ({type(e).__name__}); "
                      f"pass a local config.json or one of {', '.join(BUILTIN)}") from None


# ------------------------------------------------------------------------------------------------- the setup
@dataclass
class Setup:
    seq_len: int
    batch_size: int
    lora_r: int = 16
    lora_targets: tuple = PROJECTIONS
    checkpointing: bool = True
    offload: bool = False
    dtype: str = "bf16"  # compute dtype (autocast) and dtype of the high-precision base weights
    optimizer: str = "adamw"
    quantize: str = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    loss_chunk: int = 1024
    supervised: int | None = None  # supervised positions per micro-batch; None = worst case B*(T-1)
    packed: bool = False  # packed rows pass a (B, 1, T, T) boolean mask to SDPA instead of is_causal
    sdpa: str = "auto"  # auto | flash | efficient | math: the SDPA kernel (auto: what llama.py's call gets)
    device: str = "cuda"

    @property
    def cbytes(self) -> int:
        return torch.finfo(DTYPES[self.dtype]).bits // 8

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def rows(self) -> int:
        n = self.batch_size * (self.seq_len - 1) if self.supervised is None else self.supervised
        return max(0, n)


@dataclass
class Row:
    group: str  # static | saved | transient | outside
    name: str
    bytes: int
    note: str = ""
    where: str = "device"  # device | host


@dataclass
class Ledger:
    rows: list[Row] = field(default_factory=list)
    peak: int = 0
    peak_other: int = 0  # peak with the other checkpointing choice, for comparison
    transient_name: str = ""

    def add(self, *a, **kw):
        self.rows.append(Row(*a, **kw))

    def total(self, group: str, where: str = "device") -> int:
        return sum(r.bytes for r in self.rows if r.group == group and r.where == where)

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "predicted_peak_bytes": self.peak,
                "predicted_peak_other_bytes": self.peak_other, "transient": self.transient_name}


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
        led.add("static", "projection weights (not quantized)", L * n * c, f"{s.dtype}")
    emb = V * H * c
    led.add("static", "embeddings" + (" (tied lm_head)" if cfg.tie_word_embeddings else ""), emb,
            f"{V}×{H} {s.dtype}")
    if not cfg.tie_word_embeddings:
        led.add("static", "lm_head", emb, f"{V}×{H} {s.dtype}")
    led.add("static", "norms", (2 * L + 1) * H * c, f"{2 * L + 1}×{H} {s.dtype}")
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


# ------------------------------------------------------------------------------------- saved activations
def sdpa_kernel(cfg, s: Setup) -> str:
    """Which SDPA kernel model/llama.py's call gets. With a mask (packed rows) it copies k/v to every head and
    SDPA takes the memory-efficient kernel on CUDA (the CPU build's flash kernel accepts masks); without one,
    grouped k/v go to the flash kernel (assumed sm >= 80 here: on a T4 llama.py also copies k/v, and the
    efficient kernel saves the same tensors plus those copies)."""
    if s.sdpa != "auto":
        return s.sdpa
    return "efficient" if s.device == "cuda" and s.packed else "flash"


def kv_expanded(cfg, s: Setup) -> bool:
    """llama.py copies k/v to all heads whenever there is a mask (packed rows) and kv heads < heads."""
    return s.packed and cfg.num_key_value_heads != cfg.num_attention_heads


def block_saved(cfg, s: Setup) -> list[tuple[str, int]]:
    """What autograd keeps for one decoder block (model/llama.py Block) without checkpointing, tensor by tensor.
    n = B*T tokens, c = compute dtype bytes. Frozen Linear4bit/nn.Linear save no input (no weight gradient);
    LoRA's A saves its input, B its rank-r input; SwiGLU (_SiluMul) keeps gate and up.
    (The first block's input_layernorm saves nothing: its input, the frozen embedding, needs no gradient.)"""
    n, c, H, I = s.tokens, s.cbytes, cfg.hidden_size, cfg.intermediate_size
    nh, nkv, hd, r = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, s.lora_r
    B, T_ = s.batch_size, s.seq_len
    T = set(s.lora_targets) if r > 0 else set()
    kernel = sdpa_kernel(cfg, s)
    out = [
        ("input_layernorm: input (the block input)", n * H * c),  # model/llama.py _RMSNormFn keeps x as it is
        ("input_layernorm: rsqrt", n * 4),
        ("q after RoPE", n * nh * hd * c),
        ("k after RoPE" + (", copied to all heads" if kv_expanded(cfg, s) else ""),
         n * (nh if kv_expanded(cfg, s) else nkv) * hd * c),
        ("v" + (", copied to all heads" if kv_expanded(cfg, s) else ""),
         n * (nh if kv_expanded(cfg, s) else nkv) * hd * c),
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
    if kernel != "math" and s.packed:
        # SDPA turns the boolean mask into an additive one per call; the fused kernel keeps it for backward
        out.append(("SDPA additive mask (packed rows)", B * T_ * T_ * c))
    out += [
        ("post_attention_layernorm: input", n * H * c),
        ("post_attention_layernorm: rsqrt", n * 4),
        ("gate_proj output", n * I * c),
        ("up_proj output", n * I * c),  # _SiluMul keeps gate and up only, not silu(gate)
    ]
    if T & {"q_proj", "k_proj", "v_proj"}:
        out.append(("LoRA input: attention norm output", n * H * c))
    if "o_proj" in T and kernel == "math":
        # fused kernels return (B, T, heads, hd)-contiguous output: the transpose+reshape is then a view of it
        out.append(("LoRA input: attention output", n * nh * hd * c))
    if T & {"gate_proj", "up_proj"}:
        out.append(("LoRA input: MLP norm output", n * H * c))
    if "down_proj" in T:
        out.append(("LoRA input: silu(gate)*up", n * I * c))
    if T:
        out.append((f"LoRA rank-{r} intermediates ×{len(T)}", len(T) * n * r * c))
        if c != 4:  # the fp32 master weights are cast to the compute dtype for the matmul, and that copy is kept
            shapes = linear_shapes(cfg)
            out.append(("LoRA weights cast to compute dtype",
                        sum(r * (o + i) for t, (o, i) in shapes.items() if t in T) * c))
    return out


def first_block_discount(cfg, s: Setup) -> int:
    """Bytes the first block saves less than the others: its input (the frozen embedding) needs no gradient, so
    input_layernorm saves nothing, and neither do the q/k/v adapters' A matmuls their weight copies."""
    qkv = [t for t in ("q_proj", "k_proj", "v_proj") if t in s.lora_targets] if s.lora_r > 0 else []
    casts = len(qkv) * s.lora_r * cfg.hidden_size * s.cbytes if s.cbytes != 4 else 0
    return s.tokens * cfg.hidden_size * s.cbytes + s.tokens * 4 + casts


def model_saved(cfg, s: Setup) -> list[tuple[str, int]]:
    """Saved tensors shared by all blocks or outside them (kept whether or not blocks are checkpointed)."""
    n, c, H, hd = s.tokens, s.cbytes, cfg.hidden_size, cfg.head_dim
    out = [("RoPE cos and sin", 2 * n * hd * c)]
    if s.packed and s.checkpointing:  # a checkpoint input; without checkpointing only the per-block copies stay
        out.append(("attention mask (bool, packed rows)", s.batch_size * s.seq_len * s.seq_len))
    out += [("final norm: input + rsqrt", n * H * c + n * 4),
            ("supervised hidden rows (loss input)", s.rows * H * c),
            ("label mask, targets, log-sum-exp", s.batch_size * (s.seq_len - 1) + 8 * s.rows + 4 * s.rows)]
    return out


def block_backward_working(cfg, s: Setup) -> int:
    """Gradients alive while one block runs backward, an estimate: the MLP's input/output gradients
    (3 × n·I: d(silu·up), d(up), d(gate)) and 3 × n·H (residual grad, the norm's fp32 grad) in compute dtype."""
    n, c = s.tokens, s.cbytes
    return 3 * n * cfg.intermediate_size * c + 3 * n * cfg.hidden_size * c


def dequant_transient(cfg, s: Setup) -> int:
    """The largest dequantised weight (one at a time: Linear4bit frees it after its matmul). On the CPU our
    torch reference dequantiser also builds int64 indices and an fp32 copy: 1 + 8 + 4 bytes per weight."""
    if s.quantize != "nf4":
        return 0
    o, i = max(linear_shapes(cfg).values(), key=lambda oi: oi[0] * oi[1])
    per = s.cbytes + (13 if s.device == "cpu" else 0)
    return o * i * per


def loss_transient(cfg, s: Setup) -> int:
    """engine/loss.py's LinearCrossEntropy holds one chunk's logits at a time, in fp32 (4 bytes each), plus,
    under bf16/fp16, the compute-dtype matmul output (forward, backward) or the compute-dtype gradient (backward)
    beside it: 4 + c bytes per logit (4 in fp32)."""
    rows = min(s.loss_chunk, s.rows)
    return rows * cfg.vocab_size * (4 + (s.cbytes if s.cbytes != 4 else 0))


def predict(cfg, s: Setup) -> Ledger:
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
        led.add("saved", "block inputs (checkpointing)", 0 if s.offload else ckpt_in,
                f"{L}×[{s.batch_size},{s.seq_len},{H}] {s.dtype}" + (" → host (offload)" if s.offload else ""))
        if s.offload:
            led.add("saved", "block inputs on host (offload)", ckpt_in, "CPU RAM, not GPU", where="host")
        led.add("saved", "(without checkpointing it would be)", 0, f"{L}×{fmt(full_block)} = {fmt(L * full_block)}")
    else:
        led.add("saved", f"all blocks' saved tensors ({L}×{fmt(full_block)})", L * full_block - first,
                "see block_saved(): norm inputs, q/k/v, SDPA out, gate and up [n, I], LoRA inputs")
        led.add("saved", "(with checkpointing it would be)", 0, f"{fmt(ckpt_in)} block inputs")
    # transients: the largest one bounds the peak (they do not overlap: loss backward finishes before blocks)
    recompute = (full_block - n * H * c) if s.checkpointing else 0  # the norm's saved input is the block input
    offload_back = n * H * c if s.offload else 0  # the block input brought back for its recompute
    block_t = recompute + offload_back + block_backward_working(cfg, s) + dequant_transient(cfg, s)
    loss_t = loss_transient(cfg, s) + s.rows * H * c  # plus the gradient of the supervised hidden rows
    led.add("transient", "block backward" + (" (recomputed block + grads)" if s.checkpointing else " (grads)"),
            block_t, f"{'recompute ' + fmt(recompute) + ' + ' if s.checkpointing else ''}working grads "
            f"{fmt(block_backward_working(cfg, s))} + dequantised weight {fmt(dequant_transient(cfg, s))}")
    led.add("transient", f"loss chunk ({min(s.loss_chunk, s.rows)} rows × {cfg.vocab_size} vocab)", loss_t,
            "fp32 logits, turned into their gradient in place" + ("" if s.cbytes == 4 else f" + a {s.dtype} copy"))
    static = led.total("static")
    saved = led.total("saved")
    led.transient_name = "block backward" if block_t >= loss_t else "loss chunk"
    led.peak = static + saved + max(block_t, loss_t)
    # the other checkpointing choice, for the comparison line
    if s.checkpointing:
        other_saved = saved - (0 if s.offload else ckpt_in) + L * full_block - first
        led.peak_other = static + other_saved + max(block_backward_working(cfg, s) + dequant_transient(cfg, s), loss_t)
    else:
        other_saved = saved - (L * full_block - first) + ckpt_in
        led.peak_other = static + other_saved + max(block_t + full_block - (n * H * 4 if c == 4 else 0), loss_t)
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
            f"/{cfg.num_key_value_heads} V={cfg.vocab_size} | B={s.batch_size} T={s.seq_len} {s.dtype} "
            f"{s.quantize}{'+dq' if s.double_quant else ''} LoRA r={s.lora_r} on {len(s.lora_targets)} projections, "
            f"{'checkpointing' if s.checkpointing else 'no checkpointing'}{' + offload' if s.offload else ''}, "
            f"{s.optimizer}, loss chunk {s.loss_chunk}, {s.rows} supervised rows, "
            f"{'packed' if s.packed else 'causal'} attention, device {s.device}")


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
        where = " [host]" if r.where == "host" else ""
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
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- measuring
def saved_tensor_bytes(fn, exclude=()) -> tuple[object, dict]:
    """Run fn() under saved-tensor hooks; -> (fn's result, {device_type: bytes}) counting each storage once and
    skipping storages in `exclude` (parameters and buffers, which are already resident)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = (t.device.type, st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    by_dev: dict = {}
    for dev, b in seen.values():
        by_dev[dev] = by_dev.get(dev, 0) + b
    return out, by_dev


def module_bytes(model: torch.nn.Module) -> dict:
    """Resident parameter/buffer bytes in four groups (resident_rows with the high-precision rows summed)."""
    rows = resident_rows(model)
    hp = sum(rows.get(k, 0) for k in HIGH_PRECISION_ROWS)
    return {"quantized weights: packed NF4": rows.get("quantized weights: packed NF4", 0),
            "quantized weights: quant state": rows.get("quantized weights: quant state", 0),
            "LoRA parameters": rows.get("LoRA parameters", 0), "high-precision weights": hp}


HIGH_PRECISION_ROWS = ("embeddings", "lm_head", "norms", "projection weights (not quantized)")


def resident_rows(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Resident bytes measured on the real model, keyed by the ledger's static row names (each storage once):
    the model's parameters and buffers by module type, the LoRA gradients when backward has run, and the
    optimizer's state when it has stepped."""
    from model.quant import Linear4bit

    seen: set = set()

    def nbytes(t) -> int:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.device.type == "meta":
            return 0
        seen.add(ptr)
        return t.untyped_storage().nbytes()

    out: dict = {}

    def add(row, b):
        out[row] = out.get(row, 0) + b

    for name, mod in model.named_modules():
        for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if isinstance(mod, Linear4bit):
                row = "quantized weights: packed NF4" if pname == "weight" else "quantized weights: quant state"
            elif isinstance(t, torch.nn.Parameter) and t.requires_grad:
                row = "LoRA parameters"
            elif isinstance(mod, torch.nn.Embedding):
                row = "embeddings"
            elif name.endswith("lm_head"):
                row = "lm_head"  # untied; a tied head shares the embedding's storage and counts there
            elif "norm" in name.split(".")[-1]:
                row = "norms"
            else:
                row = "projection weights (not quantized)"
            add(row, nbytes(t))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        out["LoRA gradients"] = sum(nbytes(g) for g in grads)
    if optimizer is not None and optimizer.state:
        out["optimizer state"] = sum(nbytes(t) for st in optimizer.state.values() for t in st.values()
                                     if torch.is_tensor(t))
    return {k: v for k, v in out.items() if v}


def predicted_module_bytes(led: Ledger) -> dict:
    """The ledger's static rows in module_bytes()'s keys."""
    get = {r.name: r.bytes for r in led.rows}
    hp = sum(b for k, b in get.items() if k.split(" (")[0] in HIGH_PRECISION_ROWS or k in HIGH_PRECISION_ROWS)
    return {"quantized weights: packed NF4": get.get("quantized weights: packed NF4", 0),
            "quantized weights: quant state": get.get("quantized weights: quant state", 0),
            "LoRA parameters": get["LoRA parameters"], "high-precision weights": hp}


def build_model(cfg, s: Setup, device="cpu", seed: int = 0):
    """A Llama at cfg's shapes with random weights, built like load_model builds it (meta device, then each
    tensor assigned; projections quantized one at a time on `device`, so the full-precision model never exists),
    then LoRA and checkpointing as the trainer sets them. Random values: memory and speed depend on shapes only."""
    import torch.nn as nn

    from model.llama import Llama

    dev = torch.device(device)
    dtype = DTYPES[s.dtype]
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.device("meta"):
        model = Llama(cfg)
    std = 0.02
    for name, mod in list(model.named_modules()):
        for pname, p in list(mod.named_parameters(recurse=False)):
            if pname == "weight" and name.split(".")[-1] in PROJECTIONS and s.quantize == "nf4":
                from model.quant import Linear4bit

                w = torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32).mul_(std).to(dtype)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child,
                        Linear4bit.from_weight(w, compute_dtype=dtype, double_quant=s.double_quant,
                                               blocksize=s.blocksize))
                del w
            elif name == "lm_head" and cfg.tie_word_embeddings:
                continue
            elif "norm" in name:
                mod._parameters[pname] = nn.Parameter(torch.ones(p.shape, device=dev, dtype=dtype))
            else:
                t = torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32).mul_(std).to(dtype)
                mod._parameters[pname] = nn.Parameter(t)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)
    if s.lora_r > 0:
        from model.lora import apply_lora

        torch.manual_seed(seed)
        apply_lora(model, r=s.lora_r, alpha=2.0 * s.lora_r, targets=tuple(s.lora_targets))
        if dev.type != "cpu":
            model.to(dev)
    model.set_gradient_checkpointing(s.checkpointing, s.offload)
    for n_, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type != "meta", f"{n_} left on the meta device"
    return model.train()


def random_batch(cfg, s: Setup, device="cpu", seed: int = 0, answer_frac: float | None = None):
    """(input_ids, labels): random tokens; labels cover the last `answer_frac` of each row (completion-only),
    or exactly s.supervised positions in all when set."""
    g = torch.Generator().manual_seed(seed)
    B, T = s.batch_size, s.seq_len
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels = torch.full((B, T), -100, dtype=torch.long)
    if answer_frac is None:
        per_row = math.ceil(s.rows / B) if s.rows else 0
    else:
        per_row = max(1, int(T * answer_frac))
    per_row = min(per_row, T - 1)
    if per_row:
        labels[:, T - per_row:] = ids[:, T - per_row:]
    return ids.to(device), labels.to(device)


def measure_cpu(cfg, s: Setup) -> dict:
    """Resident parameter/buffer bytes and saved-activation bytes of one real forward (through engine/loss.py,
    under autocast when the dtype is not fp32) on the CPU, in the ledger's row names. Builds the model: for
    small models."""
    from engine.loss import chunked_ce_sum

    s_cpu = Setup(**{**asdict(s), "device": "cpu"})
    model = build_model(cfg, s_cpu, "cpu")
    ids, labels = random_batch(cfg, s_cpu)
    seg = packed_segments(s) if s.packed else None
    resident = list(model.parameters()) + list(model.buffers())
    dtype = DTYPES[s.dtype]

    def fwd():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            h = model.hidden(ids, segment_ids=seg)
            return chunked_ce_sum(h, labels, model.lm_head, s.loss_chunk)

    loss, saved = saved_tensor_bytes(fwd, exclude=resident)
    opt = None
    if loss.requires_grad:
        loss.backward()
        from engine.config import TrainConfig
        from engine.train import make_optimizer

        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(TrainConfig(optimizer=s.optimizer), params, torch.device("cpu"))
        opt.step()  # creates the optimizer state the ledger counts
    got = module_bytes(model)
    rows = resident_rows(model, opt)
    got.update(rows)
    got["total saved"] = saved.get("cpu", 0)
    got["total static"] = sum(rows.values())
    got.setdefault("LoRA gradients", 0)
    return got


def packed_segments(s: Setup) -> torch.Tensor:
    """segment ids (B, T) for a packed row of two samples: the first third, then the rest."""
    seg = torch.ones(s.batch_size, s.seq_len, dtype=torch.long)
    seg[:, s.seq_len // 3:] = 2
    return seg


def trainer_step(model, s: Setup, device, batch: dict):
    """One optimizer step exactly as engine/train.py runs it (CausalLMLoss, forward_backward with its loss
    scaling, Precision's autocast / clip / step, the trainer's optimizer), as a closure -> loss."""
    from engine.config import TrainConfig
    from engine.loss import CausalLMLoss
    from engine.precision import Precision
    from engine.train import forward_backward, make_optimizer

    device = torch.device(device)
    prec = Precision(s.dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    tc = TrainConfig(optimizer=s.optimizer, lora_r=s.lora_r, loss_chunk=s.loss_chunk)
    opt = make_optimizer(tc, params, device)
    loss_model = CausalLMLoss(model, s.loss_chunk)

    def step() -> float:
        loss, _ = forward_backward(loss_model, [batch], prec, 1)
        step.grad_bytes = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
        prec.clip_and_step(opt, params, tc.grad_clip)
        opt.zero_grad(set_to_none=True)
        return loss

    step.optimizer, step.grad_bytes = opt, 0  # for measure_cuda's per-row figures
    return step


def measure_cuda(cfg, s: Setup, steps: int = 3, log=print) -> dict:
    """Real training steps at real shapes on the GPU: random weights quantized on the GPU, the trainer's own
    step (trainer_step). Returns peak allocated/reserved and the resident bytes as measured."""
    dev = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, s, dev)
    torch.cuda.synchronize()
    got = module_bytes(model)
    ids, labels = random_batch(cfg, s, dev)
    seg = packed_segments(s).to(dev) if s.packed else None
    batch = {"input_ids": ids, "labels": labels}
    if seg is not None:
        batch["segment_ids"] = seg
    step = trainer_step(model, s, dev, batch)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        log(f"step {i}: loss {loss:.3f}, {times[-1] * 1000:.0f} ms, "
            f"peak allocated {fmt(torch.cuda.max_memory_allocated())}")
    rows = resident_rows(model, step.optimizer)  # weights, adapters and optimizer state, by ledger row
    rows["LoRA gradients"] = step.grad_bytes  # as they were between backward and the optimizer step
    got.update(rows)
    got["total static"] = sum(rows.values())
    got["peak allocated"] = torch.cuda.max_memory_allocated()
    got["peak reserved"] = torch.cuda.max_memory_reserved()
    got["step seconds"] = sorted(times)[len(times) // 2]
    return got


# ------------------------------------------------------------------------------------------ trainer hook
def setup_from_model(model, *, seq_len: int, batch_size: int, dtype: str, checkpointing: bool, offload: bool,
                     optimizer: str = "adamw", loss_chunk: int = 1024, packed: bool = False, device: str = "cuda",
                     supervised: int | None = None) -> Setup:
    """Read quantization and LoRA settings off a built model (so the ledger describes what was built)."""
    from model.quant import Linear4bit

    quant = [m for m in model.modules() if isinstance(m, Linear4bit)]
    targets, r = set(), 0
    for name, mod in model.named_modules():
        a = getattr(mod, "lora_A", None)
        if a is not None and hasattr(a, "weight"):
            targets.add(name.split(".")[-1])
            r = a.weight.shape[0]
    return Setup(seq_len=seq_len, batch_size=batch_size, lora_r=r, lora_targets=tuple(sorted(targets)),
                 checkpointing=checkpointing, offload=offload, dtype=dtype, optimizer=optimizer,
                 quantize="nf4" if quant else "none", double_quant=bool(quant and quant[0].double_quant),
                 blocksize=quant[0].blocksize if quant else 64, loss_chunk=loss_chunk, supervised=supervised,
                 packed=packed, device=device)


def log_ledger(model, log=print, **setup_kw) -> Ledger:
    """Called by the trainer once after setup: prints the predicted breakdown for the run's shapes beside the
    resident bytes actually held by the model. setup_kw as for setup_from_model. Returns the ledger."""
    s = setup_from_model(model, **setup_kw)
    led = predict(model.config, s)
    measured = resident_rows(model)  # at setup: weights and adapters (grads and optimizer state come with step 1)
    log(format_table(led, measured, title="memory ledger: " + describe(model.config, s)))
    return led


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.memory",
                                description="Predict (and optionally measure) the memory of a QLoRA training step.")
    p.add_argument("--model", default=EMBEDDED,
                   help=f"config source: {', '.join(BUILTIN)}, a config.json, an HF dir, a .gguf or a hub id")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    p.add_argument("--batch-size", type=int, required=True, help="rows per micro-batch")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (0 = no adapters)")
    p.add_argument("--lora-targets", default=",".join(PROJECTIONS), help="comma-separated projections")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="per-block activation checkpointing (default on)")
    p.add_argument("--offload", action="store_true", help="checkpointed block inputs kept in host memory")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="compute dtype (default: bf16 on cuda, "
                   "fp32 on cpu)")
    p.add_argument("--optimizer", choices=["adamw", "paged_adamw_8bit"], default="adamw")
    p.add_argument("--quantize", choices=["nf4", "none"], default="nf4")
    p.add_argument("--double-quant", action="store_true", help="NF4 double quantisation of the block scales")
    p.add_argument("--loss-chunk", type=int, default=1024, help="rows per lm_head/cross-entropy chunk")
    p.add_argument("--supervised", type=int, default=None,
                   help="supervised positions per micro-batch (default: all, the worst case)")
    p.add_argument("--packed", action="store_true", help="packed rows (SDPA gets a boolean mask)")
    p.add_argument("--sdpa", choices=["auto", "flash", "efficient", "math"], default="auto",
                   help="SDPA kernel to assume (auto: what model/llama.py's call gets; on a T4 GQA runs on math)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="device the prediction is for")
    p.add_argument("--measure", action="store_true",
                   help="also measure: real steps at these shapes on CUDA, or resident and saved bytes on the CPU")
    p.add_argument("--steps", type=int, default=3, help="steps for --measure on CUDA")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.seq_len < 2 or args.batch_size < 1:
            raise ValueError("--seq-len must be >= 2 and --batch-size >= 1")
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        bad = [t for t in targets if t not in PROJECTIONS]
        if bad:
            raise ValueError(f"--lora-targets: unknown projection {bad[0]!r} (choose from {','.join(PROJECTIONS)})")
        if args.offload and not args.checkpointing:
            raise ValueError("--offload needs --checkpointing")
        device = args.device
        if args.measure and device == "cuda" and not torch.cuda.is_available():
            device = "cpu"  # --measure on a machine without a GPU measures what it can on the CPU
        dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
        cfg = resolve_config(args.model)
        s = Setup(seq_len=args.seq_len, batch_size=args.batch_size, lora_r=args.lora_r, lora_targets=targets,
                  checkpointing=args.checkpointing, offload=args.offload, dtype=dtype, optimizer=args.optimizer,
                  quantize=args.quantize, double_quant=args.double_quant, loss_chunk=args.loss_chunk,
                  supervised=args.supervised, packed=args.packed, sdpa=args.sdpa, device=device)
        led = predict(cfg, s)
        measured = None
        if args.measure:
            log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
            if device == "cuda":
                measured = measure_cuda(cfg, s, steps=args.steps, log=log)
            else:
                log("no GPU: --measure counts resident and saved-tensor bytes on the CPU (builds the model)")
                measured = measure_cpu(cfg, s)
    except (OSError, ValueError) as e:
        print(f"engine.memory: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": args.model, "setup": asdict(s), "ledger": led.to_dict(),
                          "measured": measured}, indent=1))
    else:
        print(format_table(led, measured, title=f"memory ledger for {args.model}: {describe(cfg, s)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
