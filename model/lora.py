"""LoRA (Hu et al. 2021) on nn.Linear or NF4 Linear4bit layers, adapters in PEFT's on-disk format, and merged
full-precision export in HF's checkpoint format.

y = base(x) + (dropout(x) @ A^T @ B^T) * scaling,  A [r, in] Kaiming-uniform, B [out, r] zeros (so training
starts at the base model), scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023).

How a LoRA layer takes an nn.Linear's place: `LoRALinearDense` / `LoRALinear4bit` subclass the base class
(nn.Linear / Linear4bit) with the LoRA mixin `LoRALinear` first in the MRO. The swap builds one of them
around the *same* tensors (parameters and buffers re-registered under the same names, plain attributes
copied), so
  - the state-dict keys are the base's keys unchanged (`...q_proj.weight`, plus `absmax` for NF4), with
    `lora_A.weight` / `lora_B.weight` beside them: PEFT's file is our lora_state_dict under a fixed prefix;
  - the base computation is the base class's own forward (`super().forward`), not a copy of it, and there is
    no `.base_layer` child to unwrap (PEFT's way, which moves every key; STYLE.md).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quant import Linear4bit, _keep_dtype

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the LM)
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class _Adapter(nn.Linear):
    """lora_A / lora_B: a bias-free linear whose weight stays float32 under model.to(dtype) (master weights:
    fp16 adapters would break loss scaling on a T4, bf16 ones lose small updates)."""

    def _apply(self, fn, recurse=True):
        return super()._apply(_keep_dtype(fn, {id(self.weight)}), recurse)


class LoRALinear:
    """The LoRA half of a LoRA layer, a mixin: the concrete classes are LoRALinearDense (nn.Linear base) and
    LoRALinear4bit (Linear4bit base), so `isinstance(m, LoRALinear)` finds every LoRA layer."""

    def init_lora(self, r: int, alpha: float, dropout: float, use_rslora: bool):
        device = self.weight.device
        self.r = r
        self.lora_A = _Adapter(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = _Adapter(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.set_scaling(alpha, use_rslora)

    def set_scaling(self, alpha: float, use_rslora: bool = False):
        self.lora_alpha, self.use_rslora = alpha, use_rslora
        self.scaling = alpha / math.sqrt(self.r) if use_rslora else alpha / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # the base layer's own forward, on the same tensors
        # The branch runs in the input's dtype (as autocast would run it): the fp32 master weights are cast,
        # never the (B, T, in) activations, and their gradients come back to fp32 through the cast.
        h = self.lora_dropout(x)
        h = F.linear(h, self.lora_A.weight.to(h.dtype))  # (..., in) -> (..., r)
        h = F.linear(h, self.lora_B.weight.to(h.dtype))  # (..., r) -> (..., out)
        return y + (h * self.scaling).to(y.dtype)

    def merged_weight(self, dtype=torch.float32) -> torch.Tensor:
        """W + B @ A * scaling, [out, in], computed in float32."""
        base = self.dequantize(torch.float32) if isinstance(self, Linear4bit) else self.weight.detach().float()
        delta = (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()) * self.scaling
        return (base + delta).to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:g}"


class LoRALinearDense(LoRALinear, nn.Linear):
    pass


class LoRALinear4bit(LoRALinear, Linear4bit):
    pass


def lora_layer(base: nn.Linear | Linear4bit, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               use_rslora: bool = False) -> LoRALinear:
    """A LoRA layer holding `base`'s own tensors (not copies) and attributes; `base` itself is not kept."""
    if isinstance(base, LoRALinear):
        raise ValueError("lora_layer: the layer already has LoRA adapters")
    cls = LoRALinear4bit if isinstance(base, Linear4bit) else LoRALinearDense
    assert type(base) in (nn.Linear, Linear4bit), f"LoRA targets nn.Linear or Linear4bit, not {type(base).__name__}"
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    for key, value in vars(base).items():  # in_features, out_features, training, compute_dtype, blocksize, ...
        if not key.startswith("_"):
            setattr(layer, key, value)
    for name, p in base._parameters.items():  # includes `bias = None`, which the base forward reads
        layer.register_parameter(name, p)
    for name, b in base._buffers.items():
        layer.register_buffer(name, b, persistent=name not in base._non_persistent_buffers_set)
    layer.init_lora(r, alpha, dropout, use_rslora)
    return layer


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0, targets=TARGETS,
               use_rslora: bool = False) -> nn.Module:
    """In place: every nn.Linear / Linear4bit whose attribute name is in `targets` becomes a LoRA layer, and
    every other parameter is frozen. The settings are kept as `model.lora_config` (for save_adapter)."""
    if getattr(model, "lora_config", None):
        raise ValueError("apply_lora: the model already has LoRA adapters (load_adapter reuses them)")
    if r < 1:
        raise ValueError(f"apply_lora: r={r} must be >= 1")
    targets = tuple(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = []
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        if attr in targets and type(module) in (nn.Linear, Linear4bit):
            setattr(model.get_submodule(parent_name), attr, lora_layer(module, r, alpha, dropout, use_rslora))
            swapped.append(attr)
    if not swapped:
        raise ValueError(f"apply_lora: no nn.Linear named any of {list(targets)} in the model; "
                         f"choose target modules among {list(TARGETS)}")
    model.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                             target_modules=[t for t in targets if t in swapped])
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{`model.layers.0.self_attn.q_proj.lora_A.weight`: [r, in], ...}: the adapters only, float32."""
    return {name: p.detach() for name, p in model.named_parameters()
            if name.endswith((".lora_A.weight", ".lora_B.weight"))}


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def lora_report(model: nn.Module) -> str:
    """Trainable / frozen / quantized parameter counts and bytes. Counts come from requires_grad and module
    types, not from model.training, so a model in eval() still reports its adapters."""
    trainable = frozen = trainable_bytes = frozen_bytes = 0
    for p in model.parameters():  # tied weights are yielded once
        if p.requires_grad:
            trainable, trainable_bytes = trainable + p.numel(), trainable_bytes + p.numel() * p.element_size()
        else:
            frozen, frozen_bytes = frozen + p.numel(), frozen_bytes + p.numel() * p.element_size()
    q_layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    q_weights = sum(m.in_features * m.out_features for m in q_layers)
    q_packed = sum(m.weight.numel() for m in q_layers)
    q_held = sum(m.nbytes() for m in q_layers)
    total = trainable + frozen + q_weights
    cfg = getattr(model, "lora_config", None)
    lines = []
    if cfg:
        lines.append(f"LoRA r={cfg['r']} alpha={cfg['lora_alpha']} rslora={cfg['use_rslora']} on "
                     f"{len(lora_layers(model))} layers ({', '.join(cfg['target_modules'])})")
    lines.append(f"trainable  {trainable:>13,} params  {_fmt_bytes(trainable_bytes):>12}  "
                 f"({100 * trainable / max(total, 1):.3f}% of {total:,})")
    lines.append(f"frozen     {frozen:>13,} params  {_fmt_bytes(frozen_bytes):>12}  (high precision: "
                 "embeddings, norms, lm_head, unquantized linears)")
    if q_layers:
        fp16 = 2 * q_weights
        lines.append(f"quantized  {q_weights:>13,} weights {_fmt_bytes(q_held):>12}  in {len(q_layers)} NF4 layers "
                     f"(packed {_fmt_bytes(q_packed)} + state {_fmt_bytes(q_held - q_packed)}); "
                     f"fp16 would be {_fmt_bytes(fp16)}, ratio {q_held / fp16:.3f}")
    return "\n".join(lines)


def share_like_umask(root: Path) -> None:
    """Give root and everything under it the permissions a plain open()/mkdir() would (0666/0777 minus the
    umask): mkdtemp makes directories 0700 and safetensors writes its files 0600, which would keep an adapter,
    a checkpoint or an export from the other users a shared machine's umask lets read it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for p in Path(root).rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def _atomic_dir(path: Path):
    """Yield a temporary sibling directory; on success it replaces `path` as a whole (a reader never sees a
    half-written adapter or checkpoint), on error it is removed and `path` is untouched."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        share_like_umask(tmp)  # mkdtemp's 0700 and safetensors' 0600 -> what the umask allows
        old = None
        if path.exists():
            old = path.parent / f"{tmp.name}.old"
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter(model: nn.Module, dir, base_model: str | None = None) -> Path:
    """Write PEFT's layout: adapter_config.json + adapter_model.safetensors holding only
    `base_model.model.<module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (what PEFT, vLLM
    and our load_adapter read)."""
    from safetensors.torch import save_file

    cfg = getattr(model, "lora_config", None)
    if not cfg:
        raise ValueError("save_adapter: the model has no LoRA adapters (call apply_lora or load_adapter first)")
    alpha = cfg["lora_alpha"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model if base_model is not None else getattr(model, "source", None),
        "r": cfg["r"], "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": cfg["lora_dropout"], "target_modules": list(cfg["target_modules"]),
        "use_rslora": cfg["use_rslora"], "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    tensors = {PEFT_PREFIX + k: v.float().contiguous() for k, v in lora_state_dict(model).items()}
    with _atomic_dir(dir) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(dir)


UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "fan_in_fan_out": (False, None),
               "modules_to_save": (None, []), "layers_to_transform": (None,), "rank_pattern": ({}, None),
               "alpha_pattern": ({}, None), "lora_bias": (False, None), "target_parameters": (None, []),
               "layer_replication": (None,), "exclude_modules": (None, [])}


def _check_rank_against_weights(weights_path: Path, r: int) -> None:
    """The rank in adapter_config.json must be the rank of the stored lora_A matrices (read from the header)."""
    from safetensors import safe_open

    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                if key.endswith("lora_A.weight"):
                    stored = f.get_slice(key).get_shape()[0]
                    if stored != r:
                        raise ValueError(f"{weights_path.parent / ADAPTER_CONFIG}: r={r}, but {key} in "
                                         f"{weights_path.name} has rank {stored}; the config and weights disagree")
                    return
    except ValueError:
        raise
    except Exception as e:  # SafetensorError and OSError: an unreadable file
        raise ValueError(f"{weights_path}: unreadable safetensors file ({type(e).__name__})") from None


def load_adapter(model: nn.Module, dir) -> nn.Module:
    """Read a PEFT LoRA adapter (ours or PEFT's) into `model`, applying LoRA first from adapter_config.json
    when the model has none. Every key and shape is checked; errors name the file and key."""
    from safetensors import safe_open

    dir = Path(dir)
    cfg_path, weights_path = dir / ADAPTER_CONFIG, dir / ADAPTER_WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found; an adapter directory holds {ADAPTER_CONFIG} and "
                                    f"{ADAPTER_WEIGHTS} (PEFT layout, as save_adapter writes it)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{cfg_path}: not UTF-8 text (byte {e.start}); an adapter_config.json is JSON") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: must hold a JSON object, got a {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, allowed in UNSUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported (plain LoRA only)")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise ValueError(f"{cfg_path}: target_modules must be a list of module names, got {targets!r}")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{cfg_path}: r must be a positive integer (the LoRA rank), got {r!r}")
    alpha, use_rslora = cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora", False))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"{cfg_path}: lora_alpha must be a positive number, got {alpha!r}")
    _check_rank_against_weights(weights_path, r)  # before allocating: a wrong r must not try to allocate GBs
    if not getattr(model, "lora_config", None):
        apply_lora(model, r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                   targets=targets, use_rslora=use_rslora)
    else:  # keep the model's adapters, take this file's scaling
        for layer in lora_layers(model).values():
            layer.set_scaling(alpha, use_rslora)
        model.lora_config.update(lora_alpha=alpha, use_rslora=use_rslora)
    ours = lora_state_dict(model)
    loaded = {}
    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else None
                if name not in ours:
                    raise ValueError(f"{weights_path}: unexpected key {key!r} (expected "
                                     f"{PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight for this model's "
                                     f"{', '.join(model.lora_config['target_modules'])})")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(ours[name].shape):
                    raise ValueError(f"{weights_path}: {key} has shape {tuple(t.shape)}, the model expects "
                                     f"{tuple(ours[name].shape)}; the adapter was trained for another base "
                                     "model or rank")
                loaded[name] = t
    except OSError as e:
        raise ValueError(f"{weights_path}: unreadable safetensors file ({e})") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{weights_path}: unreadable safetensors file ({e})") from None
    missing = sorted(set(ours) - set(loaded))
    if missing:
        raise ValueError(f"{weights_path}: missing key {PEFT_PREFIX + missing[0]!r} ({len(missing)} missing); "
                         "the adapter does not cover this model's LoRA layers")
    with torch.no_grad():
        for name, t in loaded.items():
            ours[name].copy_(t)
    return model


def merge_lora(model: nn.Module, dtype: torch.dtype = torch.float32):
    """A new full-precision Llama with every adapter folded in (W + B @ A * scaling) and every NF4 layer
    dequantized; plain nn.Linear layers only. The input model is left as it was."""
    from .llama import Llama

    special = {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, Linear4bit))}
    sd = {}
    for key, value in model.state_dict().items():
        module = key.rpartition(".")[0]
        if module in special or module.rpartition(".")[0] in special:  # `x.weight`/`x.absmax`, `x.lora_A.weight`
            continue
        sd[key] = value.to(dtype)
    for name, m in special.items():
        if isinstance(m, LoRALinear):
            sd[f"{name}.weight"] = m.merged_weight(dtype)
        else:
            sd[f"{name}.weight"] = m.dequantize(torch.float32).to(dtype)
        if m.bias is not None:
            sd[f"{name}.bias"] = m.bias.detach().to(dtype)
    with torch.device("meta"):
        merged = Llama(model.config)
    merged.load_state_dict(sd, assign=True, strict=True)
    if model.config.tie_word_embeddings:
        merged.lm_head.weight = merged.model.embed_tokens.weight
    for name, p in merged.named_parameters():
        assert p.device.type != "meta", f"{name} left on the meta device"
    merged.source = getattr(model, "source", None)
    return merged.eval()


def save_hf_checkpoint(model: nn.Module, dir, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """config.json + safetensors in HF's layout, readable by our loader and by transformers; sharded as
    model-0000i-of-0000N.safetensors with model.safetensors.index.json when larger than max_shard_bytes."""
    from safetensors.torch import save_file

    if any(isinstance(m, (LoRALinear, Linear4bit)) for m in model.modules()):
        raise ValueError("save_hf_checkpoint: the model has LoRA or 4-bit layers; export merge_lora(model)")
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # HF omits the tied copy (safetensors refuses shared storage anyway)
    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    shards, size = [{}], 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    dtypes = {v.dtype for v in tensors.values()}
    config = model.config.to_hf_dict()
    if len(dtypes) == 1:  # transformers loads in this dtype by default
        config["torch_dtype"] = config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    with _atomic_dir(dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return Path(dir)
