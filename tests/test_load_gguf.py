"""GGUF files as llama.cpp's convert_hf_to_gguf.py writes a Llama 3.1+/3.2 checkpoint: F32 tensors, q/k rows
permuted, llama.* metadata, and the llama3 RoPE scaling as the tensor rope_freqs.weight (llama.cpp PR #8676).
Ours must give the logits of the HF checkpoint it came from; bad files are one-line errors naming file and key."""
import copy
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model import load_model
from model.load import load_config
from tests.conftest import save_tiny_hf, tiny_config_dict

gguf = pytest.importorskip("gguf")

NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_rope_factors(c: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, written out again: per rotary frequency, the
    divisor llama.cpp applies to it."""
    s, dim = c["rope_scaling"], c["head_dim"]
    factor, low, high, orig = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                               s["original_max_position_embeddings"])
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * c["rope_theta"] ** (i / dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's half-split q/k rows -> llama.cpp's interleaved ones."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir, path, c: dict, *, rope_freqs=None, skip=(), extra=None, metadata=True):
    """The HF checkpoint in hf_dir as an F32 GGUF. rope_freqs: the factors to store (None: none); skip: metadata
    keys (without 'llama.') to leave out; extra: more tensors {name: array}."""
    sd = {k: v.float().numpy() for k, v in load_file(hf_dir / "model.safetensors").items()}
    w = gguf.GGUFWriter(str(path), "llama")
    meta = {"context_length": (w.add_context_length, 131072), "embedding_length": (w.add_embedding_length,
            c["hidden_size"]), "block_count": (w.add_block_count, c["num_hidden_layers"]),
            "feed_forward_length": (w.add_feed_forward_length, c["intermediate_size"]),
            "rope.dimension_count": (w.add_rope_dimension_count, c["head_dim"]),
            "attention.head_count": (w.add_head_count, c["num_attention_heads"]),
            "attention.head_count_kv": (w.add_head_count_kv, c["num_key_value_heads"]),
            "rope.freq_base": (w.add_rope_freq_base, c["rope_theta"]),
            "attention.layer_norm_rms_epsilon": (w.add_layer_norm_rms_eps, c["rms_norm_eps"]),
            "attention.key_length": (w.add_key_length, c["head_dim"]),
            "attention.value_length": (w.add_value_length, c["head_dim"]),
            "vocab_size": (w.add_vocab_size, c["vocab_size"])}
    for key, (add, value) in meta.items():
        if key not in skip:
            add(value)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.add_tensor("token_embd.weight", sd.pop("model.embed_tokens.weight"))
    w.add_tensor("output_norm.weight", sd.pop("model.norm.weight"))
    w.add_tensor("output.weight", sd.pop("lm_head.weight"))
    for key, t in sd.items():
        _, _, layer, rest = key.split(".", 3)
        module = rest.removesuffix(".weight")
        if module == "self_attn.q_proj":
            t = llama_cpp_permute(t, c["num_attention_heads"])
        elif module == "self_attn.k_proj":
            t = llama_cpp_permute(t, c["num_key_value_heads"])
        w.add_tensor(f"blk.{layer}.{NAMES[module]}.weight", np.ascontiguousarray(t))
    for name, t in (extra or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# The conftest config (bands at 16 and 64 positions: the scaling changes logits within a dozen tokens), and the
# Llama 3.2 band edges (8192) on a rope base that puts frequencies in all three bands of head_dim 16.
SCALINGS = {
    "short-bands": {},
    "llama-3.2-bands": dict(rope_theta=10000.0, max_position_embeddings=131072, rope_scaling=dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)),
}


@pytest.fixture(params=list(SCALINGS))
def hf_and_config(request, tmp_path):
    over = dict(SCALINGS[request.param], initializer_range=0.3)  # larger weights: RoPE visibly moves logits
    return save_tiny_hf(tmp_path / "hf", seed=3, **copy.deepcopy(over)), tiny_config_dict(**copy.deepcopy(over))


def logits(model, seed=0):
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def test_llama3_rope_freqs_tensor_gives_the_hf_checkpoints_logits(hf_and_config, tmp_path):
    hf_dir, c = hf_and_config
    path = write_gguf(hf_dir, tmp_path / "m.gguf", c, rope_freqs=llama_cpp_rope_factors(c))
    ours = load_model(path)
    torch.testing.assert_close(logits(ours), logits(load_model(hf_dir)), atol=1e-4, rtol=1e-4)
    assert ours.config.rope_scaling == c["rope_scaling"]
    assert load_config(path).rope_scaling == ours.config.rope_scaling  # metadata only, no weights read


def test_the_rope_freqs_tensor_matters(hf_and_config, tmp_path):
    """Without rope_freqs (an unscaled RoPE) the logits move: the comparison above can fail."""
    hf_dir, c = hf_and_config
    path = write_gguf(hf_dir, tmp_path / "m.gguf", c, rope_freqs=None)
    assert load_model(path).config.rope_scaling is None
    assert (logits(load_model(path)) - logits(load_model(hf_dir))).abs().max() > 1e-2


def test_rope_factors_no_llama3_scaling_reproduces_are_refused(hf_and_config, tmp_path):
    hf_dir, c = hf_and_config
    factors = llama_cpp_rope_factors(c)
    factors[len(factors) // 2 - 1] *= 1.5  # a kink no band edges produce
    path = write_gguf(hf_dir, tmp_path / "odd.gguf", c, rope_freqs=factors)
    with pytest.raises(ValueError, match=r"odd\.gguf: rope_freqs.weight .*RoPE factors are not supported") as e:
        load_model(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["block_count", "attention.head_count", "embedding_length", "vocab_size"])
def test_gguf_missing_metadata_names_the_file_and_key(tmp_path, key):
    c = tiny_config_dict()
    path = write_gguf(save_tiny_hf(tmp_path / "hf"), tmp_path / "m.gguf", c, skip=(key,))
    with pytest.raises(ValueError, match=rf"m\.gguf: GGUF metadata key 'llama\.{key}' is missing") as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_gguf_tensor_type_gguf_cannot_dequantize_names_the_file_and_tensor(tmp_path):
    c = tiny_config_dict()
    path = write_gguf(save_tiny_hf(tmp_path / "hf"), tmp_path / "m.gguf", c,
                      extra={"blk.0.extra.weight": np.zeros(4, dtype=np.float64)})  # F64: no dequantizer
    with pytest.raises(ValueError, match=r"m\.gguf: tensor blk\.0\.extra\.weight is stored as F64") as e:
        load_model(path)
    assert "\n" not in str(e.value)


def test_unexpected_gguf_tensor_is_blamed_on_the_gguf_not_config_json(tmp_path):
    c = tiny_config_dict()
    path = write_gguf(save_tiny_hf(tmp_path / "hf"), tmp_path / "m.gguf", c,
                      extra={"blk.0.extra.weight": np.zeros(4, dtype=np.float32)})
    with pytest.raises(ValueError, match="unexpected key 'model.layers.0.extra.weight'") as e:
        load_model(path)
    assert "GGUF" in str(e.value) and "config.json" not in str(e.value)
