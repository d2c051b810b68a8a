"""NF4 against bitsandbytes (the reference), and Linear4bit against F.linear with the dequantized weight."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.quant import (DYNAMIC_CODE, NF4_CODE, NF4_MIDPOINTS, Linear4bit, dequantize_absmax, nf4_dequantize,
                         nf4_quantize, quantize_absmax, quantize_linear)

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns about an optional package
bnbf = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 64), (576, 1536), (1536, 576), (192, 320), (128, 96), (3, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def weights(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def bnb_dequantize_ref(q, state):
    """bnb's pure-torch dequantize_4bit (its "default" backend). Its AVX-512 CPU kernel walks blocks row by row
    and disagrees with its own quantize_4bit when a row is not a whole number of blocks (e.g. 128x96)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    code = bnbf.get_4bit_type("nf4", device="cpu")
    return _dequantize_4bit_compute(q.view(-1), state.absmax, code, state.blocksize, state.shape, state.dtype)


def test_code_table_is_bitsandbytes():
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, bnbf.create_dynamic_map(signed=True))
    # float32 midpoints are bit for bit the thresholds of bnb's CUDA decision tree (csrc/kernels.cu)
    assert NF4_MIDPOINTS[7].item() == torch.tensor(0.03979014977812767).item()
    assert NF4_MIDPOINTS[14].item() == torch.tensor(0.8614784181118011).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_bytes_match_bitsandbytes(shape, dtype):
    w = weights(shape, dtype, seed=hash(shape) % 1000)
    packed, absmax = nf4_quantize(w)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert packed.dtype == torch.uint8 and packed.shape == (w.numel() // 2,)
    assert absmax.dtype == torch.float32 and absmax.shape == (w.numel() // 64,)
    assert torch.equal(packed, q.view(-1))
    assert torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_exact_midpoints_and_edges_match_bitsandbytes(dtype):
    # Every block holds 1.0 (so absmax = 1 and the scaled value is the value itself), the exact midpoints
    # between codes (a tie rounds to the lower code), the codes themselves, their neighbours one ulp away,
    # -1, 0, and an all-zero block (absmax 0).
    special = torch.cat([NF4_MIDPOINTS, NF4_CODE, torch.nextafter(NF4_MIDPOINTS, torch.tensor(2.0)),
                         torch.nextafter(NF4_MIDPOINTS, torch.tensor(-2.0)), torch.tensor([-1.0, 0.0])])
    g = torch.Generator().manual_seed(1)
    body = special[torch.randint(len(special), (63, 63), generator=g)]
    w = torch.cat([torch.ones(63, 1), body], dim=1).reshape(-1)
    w = torch.cat([w, torch.zeros(64)]).to(dtype)
    packed, absmax = nf4_quantize(w)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, q.view(-1)) and torch.equal(absmax, state.absmax)
    # and the rounding is what the paper says: nearest code, ties to the lower one
    idx = torch.stack((packed >> 4, packed & 0xF), 1).reshape(-1)[: 63 * 64].view(63, 64)[:, 1:]
    x = w[: 63 * 64].view(63, 64)[:, 1:].float().contiguous()
    assert torch.equal(idx.long(), torch.bucketize(x, NF4_MIDPOINTS))


def test_nf4_first_element_in_high_nibble():
    w = torch.zeros(64)
    w[0], w[1] = -1.0, 1.0  # codes 0b0000 and 0b1111
    packed, _ = nf4_quantize(w)
    assert packed[0].item() == 0x0F and packed[1].item() == 0x77  # 0.0 is code 7


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_dequantized_values_match_bitsandbytes(shape, out_dtype):
    w = weights(shape, torch.float32, seed=7)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    state.dtype = out_dtype
    ref = bnbf.dequantize_4bit(q, state) if shape[-1] % 64 == 0 else bnb_dequantize_ref(q, state)
    ours = nf4_dequantize(q.view(-1), state.absmax, shape, dtype=out_dtype)
    assert ours.dtype == out_dtype and ours.shape == shape
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (3, 64), (192, 320)])
def test_double_quant_dequantized_values_match_bitsandbytes(shape):
    w = weights(shape, torch.bfloat16, seed=3)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    s2 = state.state2
    assert s2.blocksize == 256 and torch.equal(s2.code, DYNAMIC_CODE)
    absmax = dequantize_absmax(state.absmax, s2.absmax, state.offset)
    assert torch.equal(absmax, bnbf.dequantize_blockwise(state.absmax, s2) + state.offset)
    ours = nf4_dequantize(q.view(-1), absmax, shape, dtype=torch.bfloat16)
    assert torch.equal(ours, bnbf.dequantize_4bit(q, state))


def test_double_quant_codes_match_bitsandbytes_up_to_near_ties():
    # bnb's AVX-512 CPU kernel normalises with an approximate reciprocal; values within ~1e-5 of a midpoint
    # may land on the neighbouring code there. Everything else is identical.
    g = torch.Generator().manual_seed(0)
    absmax = torch.rand(50_000, generator=g) * 0.2
    codes, scale, offset = quantize_absmax(absmax)
    ref, state = bnbf.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    assert torch.equal(offset, absmax.mean()) and torch.equal(scale, state.absmax)
    differ = codes != ref
    assert differ.float().mean() < 0.005
    normed = ((absmax - offset) / scale.repeat_interleave(256)[:50_000])[differ]
    ours_err = (normed - DYNAMIC_CODE[codes[differ].long()]).abs()
    bnb_err = (normed - DYNAMIC_CODE[ref[differ].long()]).abs()
    assert (ours_err <= bnb_err).all() and (bnb_err - ours_err < 1e-4).all()  # ours nearest; bnb's a near tie
    # and our own round trip: at most half a code step of error per block
    back = dequantize_absmax(codes, scale, offset)
    step = (DYNAMIC_CODE[1:] - DYNAMIC_CODE[:-1]).max()
    assert ((back - absmax).abs() <= scale.repeat_interleave(256)[:50_000] * step / 2 + 1e-7).all()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(192, 128), (128, 96)])  # 96: a row that is not whole blocks
def test_linear4bit_forward_and_input_grad_equal_f_linear(shape, double_quant):
    out_f, in_f = shape
    lin = nn.Linear(in_f, out_f, bias=True)
    layer = quantize_linear(lin, double_quant=double_quant)
    w = layer.dequantize()
    assert w.shape == shape and w.dtype == torch.float32
    assert torch.equal(w, nf4_dequantize(layer.weight, layer.absmax_values(), shape))
    x = torch.randn(2, 5, in_f, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = F.linear(x_ref, w, lin.bias.detach())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)


def test_linear4bit_has_no_weight_gradient_and_saves_no_dequantized_weight():
    layer = Linear4bit.from_weight(torch.randn(256, 128))
    assert not any(p.requires_grad for p in layer.parameters())
    saved = []
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert all(t.numel() < 256 * 128 for t in saved), "the dequantized weight must not be kept for backward"
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is None


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_memory_is_packed_bytes_plus_state(double_quant):
    out_f, in_f = 1536, 576
    layer = Linear4bit.from_weight(torch.randn(out_f, in_f), double_quant=double_quant)
    n = out_f * in_f
    blocks = n // 64
    state = blocks + 4 * (-(-blocks // 256)) + 4 if double_quant else 4 * blocks
    held = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert held == layer.nbytes() == n // 2 + state
    assert held / (2 * n) < (0.26 if double_quant else 0.29)  # vs fp16
    assert f"bytes={n // 2}+{state}" in repr(layer)


def test_linear4bit_state_dict_keys():
    assert set(Linear4bit.from_weight(torch.randn(64, 64)).state_dict()) == {"weight", "absmax"}
    dq = Linear4bit.from_weight(torch.randn(64, 64), double_quant=True)
    assert set(dq.state_dict()) == {"weight", "absmax_q", "absmax_scale", "absmax_offset"}
    # a layer built empty (e.g. on meta) loads a saved state dict back
    fresh = Linear4bit(64, 64, double_quant=True)
    fresh.load_state_dict(dq.state_dict())
    assert torch.equal(fresh.dequantize(), dq.dequantize())


def test_linear4bit_dtype_casts_move_but_never_round_the_quant_state():
    layer = Linear4bit.from_weight(torch.randn(128, 64))
    before = layer.absmax.clone()
    layer.to(torch.bfloat16)
    assert layer.absmax.dtype == torch.float32 and torch.equal(layer.absmax, before)
    assert layer.weight.dtype == torch.uint8


def test_linear4bit_compute_dtype_bf16():
    w = torch.randn(128, 64)
    layer = Linear4bit.from_weight(w, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    ref = F.linear(x, nf4_dequantize(*nf4_quantize(w), (128, 64), dtype=torch.bfloat16))
    assert torch.equal(layer(x), ref)


def test_linear4bit_follows_autocast():
    w = torch.randn(128, 64)
    layer = Linear4bit.from_weight(w)  # compute_dtype float32, overridden by autocast
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.detach().bfloat16(), layer.dequantize(torch.bfloat16)))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("shape,device,kernel", [((192, 128), "cpu", "bitsandbytes"), ((128, 96), "cpu", "torch"),
                                                 ((128, 96), "cuda", "bitsandbytes")])
def test_dequant_path_states_which_kernel_dequantize_runs(shape, device, kernel, monkeypatch):
    import model.quant as quant

    assert quant.dequant_path(shape, 64, device, torch.float32).kernel == kernel
    if device == "cpu":  # and Linear4bit.dequantize follows it
        used = []
        monkeypatch.setattr(quant, "_bnb_dequantize", lambda *a: used.append("bitsandbytes"))
        monkeypatch.setattr(quant, "nf4_dequantize", lambda *a: used.append("torch"))
        quant.Linear4bit.from_weight(torch.randn(shape)).dequantize()
        assert used == [kernel]


@pytest.mark.parametrize("shape,dtype,double_quant,kernel", [
    ((128, 96), torch.float32, False, "torch"),  # rows not whole blocks: the torch reference
    ((128, 96), torch.bfloat16, False, "torch"),
    ((192, 128), torch.float32, False, "bitsandbytes"),
    ((192, 128), torch.bfloat16, False, "bitsandbytes"),
    ((192, 128), torch.bfloat16, True, "bitsandbytes"),  # + the fp32 absmax it restores first
])
def test_dequant_path_transient_bytes_are_what_dequantize_allocates(shape, dtype, double_quant, kernel):
    """dequant_path's bytes (which the memory ledger adds for the weight being dequantized) against the CPU
    allocator's record of one real Linear4bit.dequantize; the bitsandbytes kernel allocates a few bytes more
    than its output (128 here)."""
    from engine.memory import peak_allocated_bytes
    from model.quant import Linear4bit, dequant_path

    torch.manual_seed(0)
    layer = Linear4bit.from_weight(torch.randn(*shape) * 0.02, double_quant=double_quant)
    path = dequant_path(shape, 64, "cpu", dtype, double_quant)
    _, measured = peak_allocated_bytes(lambda: layer.dequantize(dtype))
    assert path.kernel == kernel
    assert path.transient_bytes <= measured <= path.transient_bytes + 256, (measured, path.transient_bytes)


def test_bitsandbytes_without_a_cuda_library_for_this_torch_is_one_line_before_anything_loads(tmp_path, monkeypatch,
                                                                                              capsys):
    """On CUDA, bitsandbytes loads libbitsandbytes_cuda<torch's CUDA version>.so when imported; when that fails
    it keeps a stand-in that raises at the first kernel call, which for a training run is the first forward, after
    the weights have loaded. model.quant.bitsandbytes_problem says so first, in one line (what failed and which
    CUDA versions the installed package ships), and launch.sh's preflight stops with it (exit 2, nothing
    written). No GPU here: the failed load is simulated with bitsandbytes' own stand-in."""
    import glob
    import os
    import re

    import bitsandbytes
    from bitsandbytes import cextension

    from engine.train import preflight
    from model.quant import bitsandbytes_problem

    assert bitsandbytes_problem("cpu") is None
    assert bitsandbytes_problem("cuda") is None  # this machine's bitsandbytes loaded its (CPU) library
    stand_in = object.__new__(cextension.ErrorHandlerMockBNBNativeLibrary)
    stand_in.error_msg = "No compatible CUDA binary found at /site/bitsandbytes/libbitsandbytes_cuda129.so\nmore"
    monkeypatch.setattr(cextension, "lib", stand_in)
    assert bitsandbytes_problem("cpu") is None  # the CPU runs bnb's torch code, no native library
    msg = bitsandbytes_problem("cuda")
    libs = glob.glob(os.path.join(os.path.dirname(bitsandbytes.__file__), "libbitsandbytes_cuda*.so"))
    shipped = sorted(int(re.search(r"cuda(\d+)\.so$", f).group(1)) for f in libs)
    assert "\n" not in msg and "libbitsandbytes_cuda129.so" in msg and "more" not in msg
    assert f"torch {torch.__version__}" in msg and "BNB_CUDA_VERSION" in msg
    assert f"ships libraries for CUDA {', '.join(f'{v // 10}.{v % 10}' for v in shipped) or 'none'}:" in msg

    out = tmp_path / "pre"
    assert preflight(["--data", "synthetic", "--out", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"error: {msg}" and not out.exists()
    # only what uses bitsandbytes is stopped: bf16 base weights and torch's AdamW need none of it
    assert preflight(["--data", "synthetic", "--out", str(out), "--device", "cuda", "--quantize", "none"]) == 0
    # the same for ./launch.sh --channel (engine.channel_train: NF4 by default)
    from engine.channel_train import preflight as channel_preflight

    assert channel_preflight(["--data", "synthetic", "--out", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"error: {msg}" and not out.exists()
    assert channel_preflight(["--data", "synthetic", "--out", str(out), "--device", "cuda", "--quantize",
                              "none"]) == 0
