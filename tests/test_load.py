"""Sources: HF dirs, hub ids (through the real huggingface_hub code, offline), GGUF, the embedded default;
bad sources give one-line errors, and the CLI exits non-zero with that line."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_model
from model.generate import generate
from model.load import load_config
from tests.conftest import REPO, save_tiny_hf, tiny_config_dict


def test_embedded_smollm2_has_the_published_shapes(smollm):
    model, tok = smollm
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.intermediate_size, c.rope_theta) == (49152, 1536, 100000.0)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.chat_format == "chatml"


def test_embedded_smollm2_equals_transformers_reading_the_same_gguf(smollm, smollm_gguf):
    """The reference for our GGUF path (Q4_1 / Q8_0 dequantized, q/k rows un-permuted, tied embeddings, rope base
    100000): transformers' own GGUF loader, dequantized to fp32, on the chat prompt's tokens. Measured: logits
    within 7e-5 of each other (the largest logit is 35); q rows permuted once more move them by up to 38."""
    transformers = pytest.importorskip("transformers")
    model, tok = smollm
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name,
                                                            torch_dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(tok.chat_prompt("What is the capital of France? Answer in one sentence."))])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), ref(ids).logits.float(), atol=1e-3, rtol=0)


def test_embedded_smollm2_answers_fluently(smollm):
    # The answer FACTS.md records for this file under greedy decoding (our logits are pinned to transformers'
    # above); a wrong chat template produces gibberish instead.
    model, tok = smollm
    out = generate(model, tok, ["What is the capital of France? Answer in one sentence."], max_new_tokens=12)
    assert out == ["The capital of France is Paris."]


def _hub_cache(tmp_path, monkeypatch, repo_id, src):
    """Lay out a Hugging Face cache entry as snapshot_download leaves it, and go offline: each file stored once
    in blobs/ under its hash, the snapshot's entries relative links to it (snapshots/<rev>/f -> ../../blobs/<h>)."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    for f in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def test_hub_id_loads_through_snapshot_download_offline(tmp_path, monkeypatch, tiny_hf_dir):
    _hub_cache(tmp_path, monkeypatch, "acme/tiny-llama", tiny_hf_dir)
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_model("acme/tiny-llama")(ids), load_model(tiny_hf_dir)(ids))


def test_sharded_hub_id_loads_from_the_cache_whose_shards_are_links_into_blobs(tmp_path, monkeypatch):
    """meta-llama/Llama-3.2-3B-Instruct is two shards + an index; in the hub cache each is a link to ../../blobs/."""
    src = save_tiny_hf(tmp_path / "sharded", max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("model-*.safetensors"))) >= 2
    _hub_cache(tmp_path, monkeypatch, "acme/sharded-llama", src)
    ids = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(load_model("acme/sharded-llama")(ids), load_model(src)(ids), rtol=0, atol=0)


def test_hub_downloads_the_top_level_checkpoint_only():
    """huggingface_hub's fnmatch lets * cross "/": subfolder variants (original/, onnx/, a second precision) must be
    kept out explicitly. The file list is Llama 3.2 3B Instruct's, plus variants other repos carry."""
    from huggingface_hub.utils import filter_repo_objects

    from model.load import HUB_IGNORE, HUB_PATTERNS

    files = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
             "tokenizer.json", "tokenizer_config.json", "original/consolidated.00.pth", "original/params.json",
             "original/tokenizer.model", "onnx/model.safetensors", "fp8/model-00001-of-00001.safetensors",
             "consolidated.safetensors", "LICENSE.txt", "README.md"]
    got = list(filter_repo_objects(files, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORE))
    assert got == files[:8]


def test_a_hub_tokenizer_downloads_no_weights(tmp_path, monkeypatch, tiny_hf_dir, llama3_tokenizer_json):
    """data.check --tokenizer ORG/NAME needs a few MB of tokenizer files, not the model's safetensors."""
    import huggingface_hub

    from model import load_tokenizer

    shutil.copy(llama3_tokenizer_json, tiny_hf_dir / "tokenizer.json")
    _hub_cache(tmp_path, monkeypatch, "acme/tiny-llama", tiny_hf_dir)
    asked, real = [], huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: asked.append(kw["allow_patterns"]) or real(repo_id, **kw))
    tok = load_tokenizer("acme/tiny-llama")
    assert tok.encode("hello") == load_tokenizer(tiny_hf_dir).encode("hello")
    assert "tokenizer.json" in asked[0] and not any("safetensors" in p for p in asked[0])
    load_model("acme/tiny-llama")
    assert any(p.endswith(".safetensors") for p in asked[1])


def test_hub_id_not_cached_offline_is_one_line_error(tmp_path, monkeypatch, tiny_hf_dir):
    _hub_cache(tmp_path, monkeypatch, "acme/tiny-llama", tiny_hf_dir)
    with pytest.raises(OSError, match=r"^acme/other: not in the Hugging Face cache .* HF_HUB_OFFLINE is set") as e:
        load_model("acme/other")
    assert "\n" not in str(e.value)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_model(tmp_path / "nope")


def test_missing_config(tmp_path, tiny_hf_dir):
    (tiny_hf_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(tiny_hf_dir)


def test_truncated_safetensors(tiny_hf_dir):
    f = tiny_hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors: unreadable safetensors file"):
        load_model(tiny_hf_dir)


def test_wrong_shape_names_the_key(tiny_hf_dir):
    f = tiny_hf_dir / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight has shape \(100, 64\)"):
        load_model(tiny_hf_dir)


def test_missing_key_is_named(tiny_hf_dir):
    f = tiny_hf_dir / "model.safetensors"
    sd = load_file(f)
    del sd["model.norm.weight"]
    save_file(sd, f)
    with pytest.raises(ValueError, match="missing weight 'model.norm.weight'"):
        load_model(tiny_hf_dir)


def test_unknown_rope_type(tiny_hf_dir):
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (tiny_hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        load_model(tiny_hf_dir)


@pytest.mark.parametrize("breakage", ["missing_dir", "truncated"])
def test_cli_exits_nonzero_with_one_line(tmp_path, breakage):
    path = save_tiny_hf(tmp_path / "m")
    if breakage == "missing_dir":
        path = tmp_path / "absent"
    else:
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    r = subprocess.run([sys.executable, "-m", "model.generate", "--model", str(path), "--prompt", "hi"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path.name) in lines[0], r.stderr


def test_nf4_load_quantizes_block_projections_only(tiny_hf_dir):
    from model.quant import Linear4bit

    m = load_model(tiny_hf_dir, quantize="nf4")
    blk = m.model.layers[0]
    assert isinstance(blk.self_attn.q_proj, Linear4bit) and isinstance(blk.mlp.down_proj, Linear4bit)
    assert isinstance(m.lm_head, torch.nn.Linear) and not isinstance(m.lm_head, Linear4bit)
    ref = load_model(tiny_hf_dir)
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        a, b = m(ids), ref(ids)
    # 4-bit weights: close to the full-precision model, not equal to it
    assert 0 < (a - b).abs().max() < 0.1 * b.abs().max() + 0.05


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                   "sub/../model.safetensors"])
def test_shard_names_leading_out_of_the_model_directory_are_refused(tiny_hf_dir, shard):
    (tiny_hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": shard}}))
    with pytest.raises(ValueError, match="outside the model directory"):
        load_model(tiny_hf_dir)


LLAMA3 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)


@pytest.mark.parametrize("change", [{"num_key_value_heads": 3}, {"hidden_size": "64"}, {"num_hidden_layers": 0},
                                    {"rms_norm_eps": "tiny"}, {"rope_scaling": [1, 2]},
                                    {"rope_scaling": dict(LLAMA3, factor="32")},
                                    {"rope_scaling": dict(LLAMA3, original_max_position_embeddings=None)}])
def test_inconsistent_or_mistyped_config_json_is_a_one_line_error(tiny_hf_dir, change):
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    cfg.update(change)
    (tiny_hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json") as e:
        load_model(tiny_hf_dir)
    assert "\n" not in str(e.value) and next(iter(change)) in str(e.value)


def test_config_json_holding_no_object_names_the_file(tiny_hf_dir):
    (tiny_hf_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"tiny-llama/config\.json: must hold a JSON object") as e:
        load_model(tiny_hf_dir)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["bitsandbytes", "gptq", "awq", "fp8"])
def test_pre_quantized_checkpoints_are_refused_up_front(tiny_hf_dir, method):
    """e.g. unsloth/Llama-3.2-3B-Instruct-bnb-4bit: packed weights whose shapes would fail later, confusingly."""
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (tiny_hf_dir / "config.json").write_text(json.dumps(cfg))
    for load in (load_model, load_config):
        with pytest.raises(ValueError, match="pre-quantized checkpoints are not supported; use the original") as e:
            load(tiny_hf_dir)
        assert "\n" not in str(e.value) and method in str(e.value)


def test_a_key_in_two_safetensors_files_names_both(tiny_hf_dir):
    """Without an index every *.safetensors is read: a second checkpoint beside the first must not overwrite it."""
    shutil.copy(tiny_hf_dir / "model.safetensors", tiny_hf_dir / "model-old.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor '[\w.]+' is also in model-old\.safetensors"):
        load_model(tiny_hf_dir)


def test_legacy_rotary_inv_freq_keys_are_skipped(tiny_hf_dir):
    """Older transformers saved each layer's rotary_emb.inv_freq; it is computed from config.json."""
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        want = load_model(tiny_hf_dir)(ids)
    f = tiny_hf_dir / "model.safetensors"
    sd = load_file(f)
    for i in range(2):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # never read: zeros would show
    save_file(sd, f)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tiny_hf_dir)(ids), want, rtol=0, atol=0)


# ------------------------------------------------------------------ load_config: shapes without weights
def test_builtin_llama_3_2_3b_shapes_are_the_released_config():
    cfg = load_config("llama-3.2-3b")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (3072, 8192, 28)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (24, 8, 128, 128256)
    assert cfg.tie_word_embeddings and cfg.rope_scaling["factor"] == 32.0


def test_gguf_metadata_gives_the_builtin_smollm2_shapes(smollm_gguf):
    got, want = load_config(str(smollm_gguf)), load_config("smollm2-135m")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings")
    assert {k: getattr(got, k) for k in keys} == {k: getattr(want, k) for k in keys}


def test_config_json_file_and_hf_dir_are_read_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config_dict()))
    assert load_config(str(tmp_path / "config.json")).hidden_size == 64
    assert load_config(str(tmp_path)).num_hidden_layers == 2


def test_load_config_takes_a_preset_name_without_the_embedded_package():
    cfg = load_config("smollm2-135m")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert load_config(cfg) is cfg


def test_random_init_builds_what_loading_builds_and_is_seeded(tiny_hf_dir):
    loaded = load_model(str(tiny_hf_dir), quantize="nf4")
    a = load_model(str(tiny_hf_dir), init="random", seed=1, quantize="nf4")
    b = load_model(str(tiny_hf_dir / "config.json"), init="random", seed=1, quantize="nf4")
    c = load_model(str(tiny_hf_dir), init="random", seed=2, quantize="nf4")
    shapes = {k: (v.shape, v.dtype) for k, v in loaded.state_dict().items()}
    assert {k: (v.shape, v.dtype) for k, v in a.state_dict().items()} == shapes
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in shapes)
    assert not torch.equal(a.state_dict()["model.embed_tokens.weight"], c.state_dict()["model.embed_tokens.weight"])
    assert type(a.model.layers[0].self_attn.q_proj) is type(loaded.model.layers[0].self_attn.q_proj)
