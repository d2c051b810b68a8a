"""LoRA adapters on disk, in PEFT's layout (DESIGN.md): adapter_config.json + adapter_model.safetensors holding
only `base_model.model.<module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]. What PEFT, vLLM and
our load_adapter read; vLLM rejects any other key.

Our state-dict keys equal the HF module paths (model/lora.py keeps them through the swap), so a file key is our
lora_state_dict key under PEFT's fixed prefix, with no remapping table.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import EMBEDDED
from .files import atomic_dir
from .llama import Llama
from .lora import TARGETS, apply_lora, lora_layers, lora_state_dict

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the LM)
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"

OFF = (None, False, {}, [], "")  # PEFT's "off" values: a field left so does not change what the weights mean
# adapter_config.json fields that change what the weights mean, with the values that leave plain LoRA; we load
# plain LoRA only, so any other value is refused rather than silently ignored
UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "fan_in_fan_out": (False, None),
               "modules_to_save": (None, []), "layers_to_transform": (None,), "rank_pattern": ({}, None),
               "alpha_pattern": ({}, None), "lora_bias": (False, None), "target_parameters": (None, []),
               "layer_replication": (None,), "exclude_modules": (None, []),
               # LoRA variants: the same lora_A / lora_B keys under another computation (aLoRA: only from the
               # invocation tokens on; QALoRA: pooled inputs; BD-LoRA: block-diagonal factors, lora_B [out, r/n];
               # VeLoRA, MonteCLoRA, Arrow, KaSA), new trainable token rows, Megatron's parallel layers
               "alora_invocation_tokens": OFF, "use_qalora": OFF, "use_bdlora": OFF, "trainable_token_indices": OFF,
               "velora_config": OFF, "monteclora_config": OFF, "arrow_config": OFF, "kasa_config": OFF,
               "megatron_config": OFF,
               # how A and B started, on the unchanged base: orthogonal and MiCA set A and B only, EVA sets A from
               # activations (B zero); PEFT's source writes no base weight for them (tuners/lora/layer.py), and
               # MiCA's frozen B matters only to training in PEFT. pissa, olora, loftq, corda and lora_ga rewrite
               # the base weights as they start: such an adapter fits only that modified base, and is refused
               "init_lora_weights": (True, False, "gaussian", "orthogonal", "eva", "mica", None)}
# Fields that do not change what the weights mean: the ones read below, PEFT's bookkeeping, the base's revision,
# and sub-configs that act only together with a setting refused above (loftq_config with init "loftq",
# layers_pattern with layers_to_transform, qalora_group_size with use_qalora, ensure_weight_tying with tied
# embeddings as targets...). Any other field (a future variant) must hold an OFF value.
KNOWN = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
         "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version", "layers_pattern",
         "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
         "runtime_config", "ensure_weight_tying"}
# Where each target sits in decoder layer i (model/llama.py's names, the HF module paths PEFT matches against)
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
assert set(PARENT) == set(TARGETS)
MAX_LAYERS = 512  # a regex target is tried on layers 0..511 (Llama 3.1 405B has 126)


def save_adapter(model: Llama, dir, base_model: str | None = None) -> Path:
    """Write `dir` in PEFT's layout, atomically (a reader never sees a half-written adapter). base_model
    (default: where the model was loaded from) becomes base_model_name_or_path."""
    cfg = model.lora_config
    if not cfg:
        raise ValueError("save_adapter: the model has no LoRA adapters (call apply_lora or load_adapter first)")
    alpha = cfg["lora_alpha"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_name(base_model if base_model is not None else model.source),
        "r": cfg["r"], "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": cfg["lora_dropout"], "target_modules": list(cfg["target_modules"]),
        "use_rslora": cfg["use_rslora"], "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    tensors = {PEFT_PREFIX + k: v.float().contiguous() for k, v in lora_state_dict(model).items()}
    with atomic_dir(dir) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(dir)


def _base_name(source: str | None) -> str | None:
    """A local model path made absolute: evaluate and extract, run from another directory, would take a relative
    one for a hub id. Hub ids and the embedded name stay as they are."""
    if source is None or source == EMBEDDED or not Path(source).expanduser().exists():
        return source
    return os.path.abspath(Path(source).expanduser())


def load_adapter(model: Llama, dir) -> Llama:
    """Read a PEFT LoRA adapter (ours or PEFT's) into `model`, applying LoRA first from adapter_config.json
    when the model has none. Every key and shape is checked; errors name the file and key."""
    cfg_path, weights_path = _adapter_files(dir)
    cfg = _read_config(cfg_path)
    r, alpha, use_rslora = cfg["r"], cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora", False))
    _check_rank_against_weights(weights_path, r)  # before allocating: a wrong r must not try to allocate GBs
    if not model.lora_config:
        apply_lora(model, r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                   targets=cfg["target_modules"], use_rslora=use_rslora)
    else:  # keep the model's adapters, take this file's scaling
        for layer in lora_layers(model).values():
            layer.set_scaling(alpha, use_rslora)
        model.lora_config.update(lora_alpha=alpha, use_rslora=use_rslora)
    ours = lora_state_dict(model)
    loaded = _read_weights(weights_path, ours, model.lora_config["target_modules"])
    missing = sorted(set(ours) - set(loaded))
    if missing:
        targets = ", ".join(model.lora_config["target_modules"])
        raise ValueError(f"{weights_path}: missing key {PEFT_PREFIX + missing[0]!r} ({len(missing)} of {len(ours)} "
                         f"missing); the adapter covers only some layers of {targets} (or was made for another "
                         "model), and we load an adapter on every layer of its targets: use one trained on all of "
                         "them")
    with torch.no_grad():
        for name, t in loaded.items():
            ours[name].copy_(t)
    return model


def check_adapter(dir) -> dict:
    """An adapter directory checked without a model, for commands that pass it on rather than load it
    (engine.export): the config as load_adapter checks it, every stored tensor readable, every key a PEFT LoRA
    key of the configured targets, lora_A's rank r. Returns the config."""
    cfg_path, weights_path = _adapter_files(dir)
    cfg = _read_config(cfg_path)
    _check_rank_against_weights(weights_path, cfg["r"])
    suffixes = tuple(f".{t}.lora_{m}.weight" for t in cfg["target_modules"] for m in "AB")
    try:
        with safe_open(weights_path, framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                if not (key.startswith(PEFT_PREFIX) and key.endswith(suffixes)):
                    raise ValueError(f"{weights_path}: unexpected key {key!r} (expected {PEFT_PREFIX}<module>"
                                     f".lora_A.weight / .lora_B.weight for {', '.join(cfg['target_modules'])})")
                f.get_tensor(key)  # read in full: a file cut short fails here, not in the user's loader
    except ValueError:
        raise
    except Exception as e:  # SafetensorError and OSError: an unreadable file
        raise ValueError(f"{weights_path}: unreadable safetensors file ({' '.join(str(e).split())}); save the "
                         "adapter again (a training run writes OUT/adapter)") from None
    if not keys:
        raise ValueError(f"{weights_path}: holds no LoRA weights")
    return cfg


def _adapter_files(dir) -> tuple[Path, Path]:
    """(adapter_config.json, adapter_model.safetensors) of an adapter directory, both present."""
    dir = Path(dir)
    cfg_path, weights_path = dir / ADAPTER_CONFIG, dir / ADAPTER_WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found; an adapter directory holds {ADAPTER_CONFIG} and "
                                    f"{ADAPTER_WEIGHTS} (PEFT layout, as save_adapter writes it)")
    return cfg_path, weights_path


def _read_config(cfg_path: Path) -> dict:
    """adapter_config.json, checked: a plain LoRA with target_modules, a positive integer r and a positive
    lora_alpha (PEFT's default 8 when absent). target_modules comes back as our attribute names (TARGETS), whatever
    form of PEFT's the file uses."""
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
    _check_plain_lora(cfg_path, cfg)
    cfg["target_modules"] = _targets(cfg_path, cfg.get("target_modules"))
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{cfg_path}: r must be a positive integer (the LoRA rank), got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"{cfg_path}: lora_alpha must be a positive number, got {alpha!r}")
    return cfg


def _check_plain_lora(cfg_path: Path, cfg: dict) -> None:
    """Every field that would make the weights mean something else than plain LoRA is off."""
    for key, allowed in UNSUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported (only plain LoRA loads)")
    for key in cfg.keys() - UNSUPPORTED.keys() - KNOWN:
        if cfg[key] not in OFF:
            raise ValueError(f"{cfg_path}: unknown field {key}={cfg[key]!r}; only plain LoRA loads, and this may be "
                             f"a PEFT variant (if {key} does not change what the weights mean, remove it from the "
                             "file)")


def _targets(cfg_path: Path, targets) -> list[str]:
    """PEFT's target_modules as our attribute names. PEFT selects module k for a list entry t when k == t or k
    ends with "." + t (so "q_proj", "self_attn.q_proj" and a full path "model.layers.0.self_attn.q_proj", which
    PEFT saves for "all-linear" on small models), and for a string by re.fullmatch(string, k)."""
    if isinstance(targets, str):
        return list(TARGETS) if targets.lower() == "all-linear" else _regex_targets(cfg_path, targets)
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{cfg_path}: target_modules must be a list of module names or a regex, got {targets!r}")
    names = {t: _entry_target(t) for t in targets}
    unknown = [t for t, name in names.items() if name is None]
    if unknown:
        raise ValueError(f"{cfg_path}: target_modules {unknown!r} are not linear layers of this Llama; they are "
                         f"among {list(TARGETS)} (or their paths, e.g. self_attn.q_proj)")
    return list(dict.fromkeys(names.values()))


def _entry_target(entry: str) -> str | None:
    """The target a target_modules list entry selects in a Llama, or None: it must be a dotted suffix of the
    target's path in some layer (the layer number is the entry's own when it names one)."""
    name = entry.rpartition(".")[2]
    if name not in PARENT:
        return None
    layer = re.search(r"(?:^|\.)(\d+)\.", entry)
    path = f"model.layers.{layer.group(1) if layer else 0}.{PARENT[name]}.{name}"
    return name if path == entry or path.endswith("." + entry) else None


def _regex_targets(cfg_path: Path, pattern: str) -> list[str]:
    """The targets whose path in some decoder layer the regex fullmatches. One that covers only some layers
    is reported by load_adapter's missing-key error (we adapt every layer of a target)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{cfg_path}: target_modules {pattern!r} is not a valid regex ({e})") from None
    others = [m for m in ("lm_head", "model.embed_tokens") if rx.fullmatch(m)]
    if others:
        raise ValueError(f"{cfg_path}: target_modules regex {pattern!r} also selects {others[0]}; only the linear "
                         f"layers of the decoder layers load ({list(TARGETS)})")
    names = [t for t in TARGETS if any(rx.fullmatch(f"model.layers.{i}.{PARENT[t]}.{t}") for i in range(MAX_LAYERS))]
    if not names:
        raise ValueError(f"{cfg_path}: target_modules regex {pattern!r} selects no linear layer of a Llama "
                         f"(model.layers.<i>.self_attn.q_proj, ...; the targets are {list(TARGETS)})")
    return names


def _check_rank_against_weights(weights_path: Path, r: int) -> None:
    """The rank in adapter_config.json must be the rank of the stored lora_A matrices (read from the header)."""
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
        raise ValueError(f"{weights_path}: unreadable safetensors file ({type(e).__name__}); save the adapter "
                         "again (a training run writes OUT/adapter)") from None


def _read_weights(weights_path: Path, ours: dict[str, torch.Tensor], targets: list[str]) -> dict[str, torch.Tensor]:
    """{our key: tensor} for every key of the file, each one of ours with our shape; errors name the key."""
    loaded = {}
    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else None
                if name not in ours:
                    raise ValueError(f"{weights_path}: unexpected key {key!r} (expected "
                                     f"{PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight for this model's "
                                     f"{', '.join(targets)})")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(ours[name].shape):
                    raise ValueError(f"{weights_path}: {key} has shape {tuple(t.shape)}, the model expects "
                                     f"{tuple(ours[name].shape)}; the adapter was trained for another base "
                                     "model or rank")
                loaded[name] = t
    except OSError as e:
        raise ValueError(f"{weights_path}: unreadable safetensors file ({e}); save the adapter again (a training "
                         "run writes OUT/adapter)") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{weights_path}: unreadable safetensors file ({e}); save the adapter again (a training "
                         "run writes OUT/adapter)") from None
    return loaded


class AdapterBank:
    """Several adapters for one model, switched in place: each is kept as a copy of its LoRA weights and scaling,
    and use(name) copies one into the model's LoRA layers (a few MB for a small model; no module is rebuilt).
    Channel decoding with a focus stage runs two: the channel adapter that picks the sentence and the focus
    adapter that trims it (engine.evaluate --focus-adapter).

    The adapters must share the model's LoRA layout (targets and rank): one set of layers holds them in turn.
    "base" is the model without any adapter (every lora_B zero)."""

    def __init__(self, model: Llama):
        self.model = model
        self.saved: dict[str, tuple[dict[str, torch.Tensor], float, bool]] = {}
        self.active: str | None = None
        if model.lora_config:
            self.saved["main"] = self._snapshot()
            self.active = "main"

    def _snapshot(self) -> tuple[dict[str, torch.Tensor], float, bool]:
        cfg = self.model.lora_config
        return ({k: v.clone() for k, v in lora_state_dict(self.model).items()}, cfg["lora_alpha"],
                bool(cfg["use_rslora"]))

    def add(self, name: str, dir) -> "AdapterBank":
        """Read the adapter in `dir` (load_adapter's checks) and keep it as `name`; the active adapter stays."""
        assert name not in self.saved, f"adapter {name!r} already in the bank"
        cfg = _read_config(Path(dir) / ADAPTER_CONFIG) if (Path(dir) / ADAPTER_CONFIG).is_file() else None
        if self.model.lora_config and cfg is not None:
            have = self.model.lora_config
            if cfg["r"] != have["r"] or sorted(cfg["target_modules"]) != sorted(have["target_modules"]):
                raise ValueError(f"{dir}: r={cfg['r']} on {','.join(sorted(cfg['target_modules']))}, but the "
                                 f"model's adapter has r={have['r']} on {','.join(sorted(have['target_modules']))}; "
                                 "train both adapters with the same --lora-r and --lora-targets")
        fresh = not self.model.lora_config
        load_adapter(self.model, dir)
        self.saved[name] = self._snapshot()
        if fresh:  # the model had no adapter: "base" is these layers with lora_B zero, and it was the active one
            weights, alpha, rs = self.saved[name]
            self.saved["base"] = ({k: torch.zeros_like(v) if k.endswith("lora_B.weight") else v
                                   for k, v in weights.items()}, alpha, rs)
            self.active = "base"
        self.use(self.active)
        return self

    def use(self, name: str) -> None:
        """Copy adapter `name` into the model's LoRA layers."""
        if name not in self.saved:
            raise KeyError(f"no adapter {name!r} in the bank (have {', '.join(self.saved)})")
        weights, alpha, use_rslora = self.saved[name]
        ours = lora_state_dict(self.model)
        with torch.no_grad():
            for k, t in weights.items():
                ours[k].copy_(t)
        for layer in lora_layers(self.model).values():
            layer.set_scaling(alpha, use_rslora)
        self.model.lora_config.update(lora_alpha=alpha, use_rslora=use_rslora)
        self.active = name

    @contextmanager
    def using(self, name: str):
        """Adapter `name` inside the block, the one active before it after."""
        before = self.active
        self.use(name)
        try:
            yield self.model
        finally:
            self.use(before)
