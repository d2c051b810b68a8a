"""Our Llama against transformers' LlamaForCausalLM on tiny random checkpoints (fp32, atol 1e-4)."""
import json

import pytest
import torch
import torch.nn.functional as F

from model import LlamaConfig, load_model
from model.llama import rope_inv_freq
from tests.conftest import save_tiny_hf, tiny_config_dict

transformers = pytest.importorskip("transformers")


def hf_logits(path, ids):
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("over", [
    {},                                                     # GQA 4/2 + llama3 rope scaling, untied
    {"tie_word_embeddings": True},                          # tied lm_head
    {"rope_scaling": None, "num_key_value_heads": 4},       # plain rope, multi-head attention
    {"num_key_value_heads": 1, "head_dim": 32},             # MQA, head_dim != hidden/heads
])
def test_logits_match_transformers(tmp_path, over):
    path = save_tiny_hf(tmp_path / "m", **over)
    ids = torch.randint(0, 320, (2, 96))  # longer than original_max_position_embeddings=64: scaling matters
    ours = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_logits(path, ids), atol=1e-4, rtol=0)


def test_sharded_checkpoint_matches_transformers(tmp_path):
    path = save_tiny_hf(tmp_path / "m", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    ids = torch.randint(0, 320, (1, 33))
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(ids), hf_logits(path, ids), atol=1e-4, rtol=0)


def test_llama3_rope_scaling_changes_long_range_frequencies(tiny_config):
    plain = LlamaConfig.from_hf_dict(tiny_config_dict(rope_scaling=None))
    scaled, base = rope_inv_freq(tiny_config), rope_inv_freq(plain)
    # highest frequencies (short wavelengths) unchanged, lowest divided by the factor (32)
    assert scaled[0] == base[0]
    torch.testing.assert_close(scaled[-1], base[-1] / 32)


def test_llama3_rope_matches_transformers_reference_inv_freq():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = tiny_config_dict(head_dim=128, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_position_embeddings=8192))
    hf_cfg = transformers.LlamaConfig(**d)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(LlamaConfig.from_hf_dict(d)), ref.float())


def test_packed_row_equals_samples_run_alone(tiny_hf_dir):
    m = load_model(tiny_hf_dir)
    a, b = torch.randint(0, 320, (1, 7)), torch.randint(0, 320, (1, 5))
    packed = torch.cat([a, b], 1)
    pos = torch.tensor([[*range(7), *range(5)]])
    seg = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        out = m(packed, position_ids=pos, segment_ids=seg)
        torch.testing.assert_close(out[:, :7], m(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 7:], m(b), atol=1e-5, rtol=0)
        # without segment ids the second sample would see the first: different logits
        assert not torch.allclose(m(packed, position_ids=pos)[:, 7:], m(b), atol=1e-3)


def test_config_reads_transformers5_rope_parameters():
    d = tiny_config_dict()
    scaling = d.pop("rope_scaling")
    d["rope_parameters"] = {"rope_theta": 1234.0, **scaling}
    d.pop("rope_theta")
    cfg = LlamaConfig.from_hf_dict(d)
    assert cfg.rope_theta == 1234.0 and cfg.rope_scaling["factor"] == 32.0


def test_config_roundtrip_is_readable_by_transformers(tmp_path, tiny_config):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config.to_hf_dict()))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.num_key_value_heads == 2 and hf.head_dim == 16
    assert LlamaConfig.from_json(tmp_path / "config.json") == tiny_config


def test_unknown_rope_type_is_rejected():
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        LlamaConfig.from_hf_dict(tiny_config_dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def _config_file(tmp_path, **over):
    path = tmp_path / "ckpt" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(tiny_config_dict(**over)))
    return path


def _one_line_naming(excinfo, path, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg, msg
    for n in needles:
        assert n in msg, msg


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_pytorch_tanh"])
def test_hidden_act_other_than_silu_is_refused_naming_config_json(tmp_path, act):
    """llama.py computes SiLU whatever config.json says: another activation would load and run, silently wrong."""
    from model.load import load_config

    path = _config_file(tmp_path, hidden_act=act)
    for load in (LlamaConfig.from_json, load_config, lambda p: load_model(p, init="random")):
        with pytest.raises(ValueError, match=f"hidden_act '{act}' is not supported") as e:
            load(path)
        _one_line_naming(e, path, "silu")


@pytest.mark.parametrize("act", ["silu", "swish", None])
def test_silu_spellings_and_a_missing_hidden_act_load(tmp_path, act):
    over = {"hidden_act": act} if act else {}
    d = tiny_config_dict(**over)
    if act is None:
        d.pop("hidden_act")
    assert LlamaConfig.from_hf_dict(d).hidden_size == 64


@pytest.mark.parametrize("key", ["attention_bias", "mlp_bias"])
def test_projection_biases_are_refused_up_front_not_at_weight_loading(tmp_path, key):
    """Before, only a checkpoint's bias weights failed ("unexpected key"); a random-init model (engine.memory, the
    benchmark) built the biasless model silently."""
    from model.load import load_config

    path = _config_file(tmp_path, **{key: True})
    for load in (LlamaConfig.from_json, load_config, lambda p: load_model(p, init="random"),
                 lambda p: load_model(save_tiny_hf(tmp_path / "m", **{key: True}))):
        with pytest.raises(ValueError, match=f"{key} True is not supported") as e:
            load(path)
        assert "\n" not in str(e.value) and "config.json" in str(e.value)
    assert LlamaConfig.from_hf_dict(tiny_config_dict(**{key: False})).hidden_size == 64


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                                     {"type": "linear", "factor": 2.0}])
def test_rescaling_rope_types_are_refused_naming_the_file_without_advising_to_drop_them(tmp_path, scaling):
    """Linear and yarn scaling change every position: deleting rope_scaling would load a different model."""
    path = _config_file(tmp_path, rope_scaling=scaling)
    with pytest.raises(ValueError, match="rope_scaling type '(linear|yarn)' is not supported") as e:
        LlamaConfig.from_json(path)
    _one_line_naming(e, path)
    assert "remove" not in str(e.value) and "delete" not in str(e.value)


def test_dynamic_rope_is_refused_saying_up_to_which_length_it_can_be_dropped(tmp_path):
    """Dynamic NTK scaling recomputes the frequencies only beyond max_position_embeddings (transformers checks
    this: the same logits with and without it up to that length), so deleting it is safe up to there."""
    path = _config_file(tmp_path, rope_scaling={"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=96)
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic' is not supported") as e:
        LlamaConfig.from_json(path)
    _one_line_naming(e, path, "beyond 96 tokens", "rope_scaling deleted from", "up to 96 tokens")

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_config_dict(
        rope_scaling={"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=96))).eval()
    plain = save_tiny_hf(tmp_path / "plain", rope_scaling=None, max_position_embeddings=96)
    ours = load_model(plain)
    ours.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 320, (1, 96))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_gradient_checkpointing_keeps_outputs_and_grads(tiny_hf_dir):
    m = load_model(tiny_hf_dir).train()
    ids = torch.randint(0, 320, (2, 16))
    runs = []
    for ckpt, offload in [(False, False), (True, False), (True, True)]:
        m.zero_grad()
        m.set_gradient_checkpointing(ckpt, offload=offload)
        out = m(ids)
        out.square().mean().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (out0, g0), *others = runs
    assert len(g0) == len(list(m.parameters()))  # every weight got a gradient
    for out, g in others:  # bit for bit: the recomputed forward is the same computation
        torch.testing.assert_close(out, out0, atol=0, rtol=0)
        assert g.keys() == g0.keys() and all(torch.equal(g[n], g0[n]) for n in g0)


# ------------------------------------------------------------- hand-written backwards for RMSNorm and SwiGLU
def _plain_silu_mul(gate, up):
    return F.silu(gate) * up


def test_silu_mul_backward_passes_gradcheck():
    from model.llama import _SiluMul

    torch.manual_seed(0)
    gate = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SiluMul.apply, (gate, up))


def _rope_tables(B, T, hd, dtype, theta=10000.0):
    """cos, sin (B, 1, T, hd) as Llama.rope builds them: the frequencies repeated, positions restarting per row."""
    pos = torch.stack([torch.arange(T), torch.arange(T).roll(5)]).float()[:B]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).double() / hd)
    emb = torch.cat([pos.double()[..., None] * inv] * 2, dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def test_rope_backward_passes_gradcheck():
    from model.llama import apply_rope

    cos, sin = _rope_tables(2, 6, 8, torch.float64)
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_the_plain_expression_and_keeps_the_layout(dtype):
    """apply_rope against HF's x * cos + rotate_half(x) * sin through autograd, on q as the projections leave it
    ((B, T, n, hd) in memory, seen as (B, n, T, hd)): the same values and input gradients (fp32), no further from
    the fp64 truth than the plain expression (bf16), and the output in the input's layout."""
    from model.llama import apply_rope, rotate_half

    B, T, n, hd = 2, 10, 3, 16
    cos, sin = _rope_tables(B, T, hd, dtype)
    x = torch.randn(B, T, n, hd).to(dtype).transpose(1, 2).requires_grad_()
    g = torch.randn(B, n, T, hd).to(dtype)

    def run(fn, c, s, t):
        y = fn(t, c, s)
        return y, torch.autograd.grad(y, t, g.to(t.dtype))[0]

    ours = run(apply_rope, cos, sin, x)
    plain = run(lambda t, c, s: t * c + rotate_half(t) * s, cos, sin, x)
    c64, s64 = _rope_tables(B, T, hd, torch.float64)
    truth = run(lambda t, c, s: t * c + rotate_half(t) * s, c64, s64, x.detach().double().requires_grad_())
    assert ours[0].stride() == x.stride()
    for a, b, t in zip(ours, plain, truth):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b)
        else:
            assert (a.double() - t).abs().max() <= (b.double() - t).abs().max() * 1.01 + 1e-6


@pytest.mark.parametrize("chunk", [None, 200], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_swiglu_match_autograd_through_the_plain_ops(dtype, chunk, monkeypatch):
    """Same forward bits as the plain ops; gradients equal autograd's up to the rounding of the dtype, whether the
    backwards run over all rows at once or in BACKWARD_CHUNK pieces (200 elements: 3 rows of 64, 2 rows of 96,
    a last piece shorter)."""
    from model import llama
    from model.llama import RMSNorm, _SiluMul

    if chunk is not None:
        monkeypatch.setattr(llama, "BACKWARD_CHUNK", chunk)
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x = (torch.randn(2, 7, 64) * 3).to(dtype).requires_grad_()
    g = torch.randn(2, 7, 64).to(dtype)
    norm.weight.requires_grad_(True)
    y = norm(x)
    y_ref = norm._plain(x)
    assert torch.equal(y, y_ref)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), g)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, norm.weight), g)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, **tol)

    gate = torch.randn(2, 7, 96).to(dtype).requires_grad_()
    up = torch.randn(2, 7, 96).to(dtype).requires_grad_()
    h = torch.randn(2, 7, 96).to(dtype)
    out, out_ref = _SiluMul.apply(gate, up), _plain_silu_mul(gate, up)
    assert torch.equal(out, out_ref)
    got = torch.autograd.grad(out, (gate, up), h)
    ref = torch.autograd.grad(out_ref, (gate, up), h)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **tol)
    # one input needing no gradient (a frozen norm weight, an input without grad)
    norm.weight.requires_grad_(False)
    torch.testing.assert_close(torch.autograd.grad(norm(x), x, g)[0], gx, rtol=0, atol=0)
    up_const = up.detach()
    torch.testing.assert_close(torch.autograd.grad(_SiluMul.apply(gate, up_const), gate, h)[0], got[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_matches_transformers_form_op_by_op(dtype):
    """RMSNorm's one-pass inverse RMS (vector_norm) against transformers' x.float().pow(2).mean() form: fp32 to
    float rounding, bf16/fp16 within about one unit in the last place (eps x |y|), on rows large enough that fp16
    squares would overflow if the sum were not taken in fp32."""
    from model.llama import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x = (torch.randn(3, 9, 576) * 300).to(dtype)
    xf = x.float()
    hf = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)
    for y in (norm(x), norm(x.requires_grad_())):
        assert y.dtype == dtype and torch.isfinite(y).all()
        ulp = torch.finfo(dtype).eps * y.detach().float().abs().clamp_min(1e-3)
        assert ((y.detach().float() - hf.float()).abs() <= ulp * (4 if dtype == torch.float32 else 1.01)).all()


def test_norm_and_swiglu_save_less_than_autograd_would():
    """What the hand-written backwards are for: under bf16, RMSNorm keeps x in bf16 (not its fp32 copy) and
    SwiGLU keeps gate and up only (not silu(gate))."""
    from engine.memory import saved_tensor_bytes
    from model.llama import RMSNorm, _SiluMul

    norm = RMSNorm(64, 1e-5).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    _, ours = saved_tensor_bytes(lambda: norm(x), exclude=[norm.weight])
    def hf_form(t):  # transformers' LlamaRMSNorm, op by op
        tf = t.float()
        return norm.weight * (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(t.dtype)

    _, plain = saved_tensor_bytes(lambda: hf_form(x), exclude=[norm.weight])
    assert ours["cpu"] == 4 * 64 * 2 + 4 * 4  # x in bf16 + one fp32 rsqrt per row
    assert plain["cpu"] == 4 * 64 * 4 + 4 * 4  # x.float() + rsqrt
    gate = torch.randn(4, 96, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(4, 96, dtype=torch.bfloat16, requires_grad=True)
    _, ours = saved_tensor_bytes(lambda: _SiluMul.apply(gate, up))
    _, plain = saved_tensor_bytes(lambda: _plain_silu_mul(gate, up))
    assert ours["cpu"] == 2 * 4 * 96 * 2 and plain["cpu"] == 3 * 4 * 96 * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_inv_rms_makes_at_most_one_fp32_temporary_of_its_input_on_the_cpu(dtype):
    # what _inv_rms's docstring states: vector_norm copies a bf16/fp16 x to fp32 once (torch 2.13 on the CPU) and
    # an fp32 x not at all, where x.float().pow(2).mean() held two fp32 tensors of x's size
    from engine.memory import peak_allocated_bytes
    from model.llama import _inv_rms

    x = torch.randn(4096, 256).to(dtype)
    fp32 = x.numel() * 4
    _, ours = peak_allocated_bytes(lambda: _inv_rms(x, 1e-5))
    _, plain = peak_allocated_bytes(lambda: torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5))
    copies = 0 if dtype == torch.float32 else 1
    assert copies * fp32 <= ours < (copies + 0.05) * fp32 and ours <= plain - fp32 + 0.05 * fp32


@pytest.mark.parametrize("device,capability,masked,kernel,expand", [
    ("cpu", None, False, "flash", False),  # the CPU flash kernel takes grouped k/v
    ("cpu", None, True, "flash", "probe"),  # with a mask too, where this torch's does (2.13: tests/test_cpu_gqa_mask)
    ("cuda", (8, 0), False, "flash", False),
    ("cuda", (8, 0), True, "efficient", True),
    ("cuda", (7, 5), False, "efficient", True),  # T4: no flash attention, so never math: k/v copied
])
def test_attention_path_states_the_sdpa_dispatch(device, capability, masked, kernel, expand):
    from model.llama import attention_path, cpu_flash_takes_grouped_kv

    if expand == "probe":
        expand = not cpu_flash_takes_grouped_kv(masked)
    path = attention_path(24, 8, device, masked=masked, capability=capability)
    assert (path.kernel, path.expand_kv, path.masked) == (kernel, expand, masked)
    assert not attention_path(8, 8, device, masked=masked, capability=capability).expand_kv  # no GQA, no copy


def test_attention_forward_copies_kv_exactly_when_attention_path_says_so(tiny_config, monkeypatch):
    import model.llama as llama

    calls = []
    real = llama.attention_path
    monkeypatch.setattr(llama, "attention_path", lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1])
    model = llama.Llama(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (1, 12))
    seg = torch.tensor([[1] * 6 + [2] * 6])
    with torch.no_grad():
        model.hidden(ids)
        model.hidden(ids, segment_ids=seg)  # the segment path: grouped k/v stay grouped
        model.segment_attention = False
        model.hidden(ids, segment_ids=seg)  # the mask: k/v grouped where the CPU flash kernel takes them with it
    n = tiny_config.num_hidden_layers
    copied = not llama.cpu_flash_takes_grouped_kv(True)  # False on torch 2.13
    # one call per forward (Llama.attention_input chooses what the blocks get), then one per layer
    assert [c.expand_kv for c in calls] == [False] * (n + 1) + [False] * (n + 1) + [copied] * (n + 1)
    assert [c.segmented for c in calls] == [False] * (n + 1) + [True] * (n + 1) + [False] * (n + 1)
