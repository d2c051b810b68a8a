"""LlamaConfig: the shapes and constants of a Llama checkpoint, read from HF config.json or GGUF metadata."""
from __future__ import annotations

import json
from dataclasses import InitVar, asdict, dataclass, field, fields
from pathlib import Path

ROPE_TYPES = ("default", "llama3")
# The MLP's activation: llama.py computes SiLU (transformers spells it "silu", or "swish", the same function).
HIDDEN_ACTS = ("silu", "swish")
EMBEDDED = "smollm2-135m"  # the default model: SmolLM2-135M-Instruct, shipped as a GGUF file (model/load.py)

# Shapes known without a download, as HF config.json dicts (FACTS.md: Llama 3.2 3B Instruct config.json;
# SmolLM2-135M GGUF metadata). load_config takes these names; so do the ledger and the benchmark.
PRESETS = {
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


def _unsupported_rope_advice(kind: str, cfg: "LlamaConfig", where: str) -> str:
    """What to do about a rope_scaling type llama.py does not compute. Only dynamic NTK scaling may be dropped: it
    recomputes the frequencies only for sequences longer than the original context (transformers'
    _compute_dynamic_ntk_parameters), so without it the model is the same up to that length. Linear, yarn and
    the others rescale every position: without them the model would load and compute wrong."""
    if kind == "dynamic":
        n = cfg.max_position_embeddings  # the length transformers scales beyond
        return (f"dynamic scaling changes only positions beyond {n} tokens, so with rope_scaling deleted from "
                f"{where} the model is the same for sequences up to {n} tokens (keep --seq-len at most that)")
    return "use a checkpoint with llama3 or no rope scaling"


def read_json(path: Path):
    """A checkpoint's JSON file (config.json, the safetensors index), read as UTF-8 as transformers reads it;
    malformed JSON or another encoding (Windows editors save UTF-16) is one line naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-download the checkpoint") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}; an editor may have saved it as "
                         "UTF-16); save it as UTF-8 or re-download the checkpoint") from None


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False)  # unrecognised HF keys, written back unchanged
    where: InitVar[str] = "config.json"  # what the values were read from, for the errors (e.g. the file's path)

    def __post_init__(self, where: str):
        # user input (a config.json): checked with errors, not asserts, which python -O would remove
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: {k} must be a positive integer, got {v!r}")
        for k in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"{where}: {k} must be a positive number, got {v!r}")
        if not isinstance(self.tie_word_embeddings, bool):  # bool("false") is True: a quoted value would tie
            raise ValueError(f"{where}: tie_word_embeddings must be true or false (a JSON boolean), got "
                             f"{self.tie_word_embeddings!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{where}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"{where}: rope_scaling must be an object, got {self.rope_scaling!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"{where}: rope_scaling type {kind!r} is not supported (supported: "
                                 f"{', '.join(ROPE_TYPES)}); {_unsupported_rope_advice(kind, self, where)}")
            if kind == "llama3":
                missing = {"factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings"} - set(self.rope_scaling)
                if missing:
                    raise ValueError(f"{where}: rope_scaling (llama3) is missing {sorted(missing)}")
                for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    v = self.rope_scaling[k]
                    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                        raise ValueError(f"{where}: rope_scaling.{k} must be a positive number, got {v!r}")
            elif kind == "default":
                self.rope_scaling = None

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, d: dict, where: str = "config.json") -> "LlamaConfig":
        """From a config.json's dict; errors name `where` (from_json passes the file's path)."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must hold a JSON object, got a {type(d).__name__}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{where} is missing key {missing[0]!r}: is this a Llama checkpoint?")
        mt = d.get("model_type", "llama")
        if mt != "llama":
            raise ValueError(f"{where}: model_type is {mt!r}; only 'llama' checkpoints are supported")
        q = d.get("quantization_config")
        if q is not None:  # the stored weights are packed (bnb, GPTQ, AWQ, FP8): their shapes match nothing we build
            method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
            raise ValueError(f"{where} has quantization_config (quant_method {method!r}): pre-quantized "
                             "checkpoints are not supported; use the original bf16/fp16 checkpoint (this engine "
                             "quantizes to NF4 itself)")
        # What llama.py computes: SiLU, no biases. Anything else would load and run, silently wrong (the bias
        # weights would only fail later, as "unexpected key"; a random-init model, engine.memory and the
        # benchmark, would never notice).
        act = d.get("hidden_act", "silu")
        if act not in HIDDEN_ACTS:
            raise ValueError(f"{where}: hidden_act {act!r} is not supported (this Llama computes SiLU, 'silu'); "
                             "use a checkpoint whose config.json says hidden_act 'silu'")
        for k in ("attention_bias", "mlp_bias"):
            if d.get(k):
                raise ValueError(f"{where}: {k} {d[k]!r} is not supported (this Llama's projections have no bias); "
                                 f"use a checkpoint whose config.json says {k} false")
        # transformers >= 5 writes rope_parameters (rope_theta inside); released Llama 3.2 files use the
        # top-level rope_theta + rope_scaling. Read both (FACTS.md).
        rp = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling")
        if scaling is None and rp and rp.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if isinstance(scaling, dict):
            scaling = dict(scaling)
            if "rope_type" not in scaling and "type" in scaling:
                scaling["rope_type"] = scaling["type"]
        heads = d["num_attention_heads"]
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            raise ValueError(f"{where}: num_attention_heads must be a positive integer, got {heads!r}")
        if not isinstance(d["hidden_size"], int) or isinstance(d["hidden_size"], bool):
            raise ValueError(f"{where}: hidden_size must be a positive integer, got {d['hidden_size']!r}")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),  # transformers' LlamaConfig default
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            extra={k: v for k, v in d.items() if k not in known and k not in ("rope_parameters",)},
            where=where,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json not found; point --model at an HF-format Llama directory")
        d = read_json(path)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: must hold a JSON object (a Llama config.json), got a {type(d).__name__}; "
                             "re-download the checkpoint")
        return cls.from_hf_dict(d, where=str(path))

    @classmethod
    def from_gguf_fields(cls, meta: dict, where: str = "GGUF file") -> "LlamaConfig":
        """From GGUF key/value metadata (already decoded to Python values); errors name `where` (the file)."""
        arch = meta.get("general.architecture", "llama")
        if arch != "llama":
            raise ValueError(f"{where}: GGUF architecture is {arch!r}; only 'llama' is supported")

        def g(key, typ=int, default=None):
            v = meta.get(f"llama.{key}", default)
            if v is None:
                raise ValueError(f"{where}: GGUF metadata key 'llama.{key}' is missing; the file is not a complete "
                                 "llama GGUF (convert it again with llama.cpp's convert_hf_to_gguf.py)")
            try:
                return typ(v)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: GGUF metadata key 'llama.{key}' must be a number, got {v!r}") from None

        scaling = meta.get("llama.rope.scaling.type", "none")
        if scaling != "none":  # llama3 scaling comes as the rope_freqs tensor instead (model/load.py)
            raise ValueError(f"{where}: GGUF rope scaling {scaling!r} is not supported (only llama3 scaling, "
                             "stored as rope_freqs.weight); use the model's HF checkpoint")
        heads, hidden = g("attention.head_count"), g("embedding_length")
        vocab = len(meta.get("tokenizer.ggml.tokens", [])) or None  # older files: the vocabulary's length
        return cls(
            vocab_size=g("vocab_size", default=vocab), hidden_size=hidden,
            intermediate_size=g("feed_forward_length"), num_hidden_layers=g("block_count"),
            num_attention_heads=heads, num_key_value_heads=g("attention.head_count_kv", default=heads),
            head_dim=g("attention.key_length", default=hidden // heads if heads else None),
            rms_norm_eps=g("attention.layer_norm_rms_epsilon", float, 1e-5),
            rope_theta=g("rope.freq_base", float, 10000.0),
            max_position_embeddings=g("context_length", default=2048),
            tie_word_embeddings=True,  # decided by the loader from whether output.weight exists
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            where=where,
        )

    def to_hf_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                  "attention_bias": False, "mlp_bias": False})
        out = dict(self.extra)
        out.update(d)
        out.pop("rope_parameters", None)
        return out
