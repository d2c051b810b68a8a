"""--compile (model.llama.Block.set_compiled): torch.compile around each block's attention gives the eager
path's logits, loss and LoRA gradients, on packed rows (attention stays eager on the segment path) and plain
rows, with checkpointing recomputing the compiled parts in backward, and the trainer's config switches it on."""
import os
import shutil

import pytest
import torch

from .conftest import DEVICES
from .test_packed_attention import assert_same, lora_model, packed_batch, step


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_blocks_equal_eager_on_packed_rows_with_checkpointing(backend):
    """aot_eager: dynamo's graphs and AOT autograd's backward, run op by op (fast); inductor: the fused kernels
    the option is for (C++ on the CPU, Triton on CUDA). Two packings of different length: dynamic shapes, the
    segment runs change with no recompilation of the parts around attention."""
    from torch._dynamo.utils import counters

    if backend == "inductor" and not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("inductor on the CPU compiles C++: no c++/g++ on this machine (apt install g++)")
    torch._dynamo.reset()
    counters.clear()
    eager = lora_model(num_hidden_layers=4)
    compiled = lora_model(num_hidden_layers=4).set_compiled(backend=backend)
    for m in (eager, compiled):
        m.set_gradient_checkpointing(True)
    # (no row length equal to head_dim 16: dynamo would unify the two sizes and specialise on it)
    for lengths, T in (([[5, 7, 4], [9, 6]], 18), ([[3, 11], [8, 8, 2]], 20)):
        batch = packed_batch(lengths, T)
        assert_same(step(eager, *batch), step(compiled, *batch), atol=1e-4)
    plain = packed_batch([[12], [12]], 12)
    assert_same(step(eager, *plain), step(compiled, *plain), atol=1e-4)
    # one set of graphs for all 4 blocks (they share code; dynamo guards on shapes and grad state, not on which
    # block; measured 12: qkv and out, with and without grad, first block or not): graphs per block would be
    # 16 or more, and past dynamo's recompile limit the remaining blocks would silently run eagerly
    assert counters["stats"]["unique_graphs"] < 16, dict(counters["stats"])


def test_set_compiled_false_restores_the_eager_path_and_the_config_turns_it_on():
    from engine.config import TrainConfig
    from engine.step import prepare_model
    from model import LlamaConfig
    from model.llama import Llama

    from .conftest import tiny_config_dict

    block = lora_model().model.layers[0]
    block.set_compiled(backend="aot_eager")
    assert block._qkv is not None and block._out is not None
    block.set_compiled(False)
    assert block._qkv is None and block._out is None
    model = prepare_model(Llama(LlamaConfig.from_hf_dict(tiny_config_dict())), TrainConfig(compile=True), "cpu")
    assert all(b._qkv is not None for b in model.model.layers)
    model = prepare_model(Llama(LlamaConfig.from_hf_dict(tiny_config_dict())), TrainConfig(), "cpu")
    assert all(b._qkv is None for b in model.model.layers)


def test_compiled_blocks_with_mlp_tiles_equal_eager():
    """--compile with --mlp-tile: the compiled part around attention calls token_tiles, whose tiles run the
    compiled norm + MLP under their own checkpoints; same logits, loss and gradients as eager with no tiles."""
    torch._dynamo.reset()
    eager = lora_model(num_hidden_layers=2)
    compiled = lora_model(num_hidden_layers=2).set_compiled(backend="aot_eager")
    compiled.set_mlp_tile(7)
    for m in (eager, compiled):
        m.set_gradient_checkpointing(True)
    batch = packed_batch([[5, 7, 4], [9, 6]], 18)
    assert_same(step(eager, *batch), step(compiled, *batch), atol=1e-4)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_nf4_blocks_equal_eager_and_save_what_eager_saves(backend, precision, device):
    """NF4 + LoRA blocks compiled, as engine.train --compile runs them: the loss and LoRA gradients of eager, and
    the bytes eager saves for backward. Traced as one graph, _NF4Linear's forward and backward dequantize the
    same buffers the same way; the graph's common-subexpression pass merged the two calls, and every projection's
    dequantized [out, in] weight was saved from forward to backward (201 MB a block at Llama 3.2 3B shapes in
    bf16: what _NF4Linear exists to avoid). model.quant.nf4_linear keeps them apart. Without checkpointing the
    saved tensors show it: 2 blocks × 7 weights, 1 MiB more in fp32 and 0.5 MiB in bf16 before the fix
    (aot_eager also keeps 12 bytes of scalars). In bf16 compiled and eager round differently (fused fp32
    arithmetic, the plain RoPE expression): both are held to the fp32 gradients, the compiled ones no further
    off than eager's (measured: 5.97% and 5.61% at the worst tensor). fp16, the T4's precision, runs the same
    way under the CPU's fp16 autocast (measured 2.06% compiled by inductor, 2.03% aot_eager, 2.07% eager). On a
    GPU (device cuda, run by .ci/gpu_measure.sh) inductor writes Triton kernels and the NF4 ops run bitsandbytes'
    CUDA kernels."""
    from dataclasses import replace

    from engine.ledger import Setup
    from engine.loss import CausalLMLoss
    from engine.memory import random_batch, saved_tensor_bytes, training_model
    from engine.precision import dtype_of
    from model import LlamaConfig
    from model.quant import Linear4bit

    from .conftest import tiny_config_dict

    from engine.step import compile_toolchain_problem

    if backend == "inductor" and compile_toolchain_problem(device):
        pytest.skip(compile_toolchain_problem(device))
    cfg = LlamaConfig.from_hf_dict(tiny_config_dict(hidden_size=128, intermediate_size=256, head_dim=32))
    s = Setup(seq_len=24, batch_size=2, precision=precision, device=device, checkpointing=False, supervised=40)

    def run(compiled: bool, precision: str):
        torch._dynamo.reset()
        model = training_model(cfg, replace(s, precision=precision), device)
        if compiled:  # as TrainConfig.compile does (engine.step.prepare_model), with this backend
            model.set_compiled(backend=backend)
        assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: A's gradients would be zero too, and prove nothing
                p.data.normal_(0, 0.1, generator=g)
        ids, labels = random_batch(cfg, s, device)
        dtype = dtype_of(precision)

        def fwd():
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                return CausalLMLoss(model, 16)(ids, labels)

        loss, saved = saved_tensor_bytes(fwd, exclude=list(model.parameters()) + list(model.buffers()))
        loss.backward()
        return saved[device], {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (saved_e, grads_e), (saved_c, grads_c) = run(False, precision), run(True, precision)
    assert abs(saved_c - saved_e) <= 64, (saved_c, saved_e)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) == 2 * 2 * 7

    def rel(a, b):
        return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)

    if precision == "fp32":
        assert rel(grads_c, grads_e) < 1e-5
    else:
        _, ref = run(False, "fp32")
        eager_off, compiled_off = rel(grads_e, ref), rel(grads_c, ref)
        assert compiled_off < 1.5 * eager_off, (compiled_off, eager_off)



def test_a_missing_compiler_toolchain_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    """torch.compile builds its kernels in the first step: without a compiler a run loaded its model, wrote its
    run directory, then died with an opaque BackendCompilerFailed (seen here with no g++ on PATH).
    engine.step.compile_toolchain_problem names what is missing first: the CPU's C++ compiler (inductor's own
    search), CUDA's C compiler for Triton, or Python's headers; engine.train --compile then stops with one
    line and exit 2, and leaves no run directory."""
    import subprocess
    import sys
    import sysconfig

    from torch._inductor import config as inductor_config
    from torch._inductor import cpp_builder

    from engine.step import compile_toolchain_problem

    from .conftest import REPO

    headers = os.path.isfile(os.path.join(sysconfig.get_config_var("INCLUDEPY"), "Python.h"))
    if headers and (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        assert compile_toolchain_problem("cuda") is None
    if headers and shutil.which(os.environ.get("CXX", "g++")):
        assert compile_toolchain_problem("cpu") is None  # what the inductor tests above ran with
    monkeypatch.setattr(sysconfig, "get_paths", lambda scheme=None: {"include": str(tmp_path)})
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: str(tmp_path) if name == "INCLUDEPY" else None)
    monkeypatch.setenv("CC", sys.executable)  # a file that exists: only the headers are missing
    assert "apt install python3-dev" in compile_toolchain_problem("cuda")
    monkeypatch.undo()

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, g++ or clang in it
    assert "C compiler for Triton" in compile_toolchain_problem("cuda")
    cpp_builder.cpp_compiler_search.cache_clear()  # torch caches its search by what it searches for
    # inductor's own config.patch, not monkeypatch: under torch 2.11, monkeypatch's restore of a sub-config value
    # left inductor_config.cpp.cxx unreadable, and every later --compile check in the session failed
    try:
        with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler")}):
            assert "C++ compiler for inductor" in compile_toolchain_problem("cpu")
            # launch.sh's preflight (one process, before torchrun starts N): the same line, once
            from engine.train import preflight

            assert preflight(["--data", "synthetic", "--out", str(tmp_path / "pre"), "--device", "cpu",
                              "--compile"]) == 2
            assert not (tmp_path / "pre").exists()
    finally:
        cpp_builder.cpp_compiler_search.cache_clear()

    out = tmp_path / "run"
    env = {**os.environ, "PATH": str(tmp_path), "CXX": "no-such-compiler", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "engine.train", "--model", "smollm2-135m", "--data", "synthetic",
                        "--out", str(out), "--device", "cpu", "--max-steps", "1", "--compile"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --compile on the CPU needs a C++ compiler"), r.stderr
    assert "apt install g++" in lines[0] and not out.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_rms_norm_gives_eager_gradients(dtype):
    """The norm's custom autograd function traced by dynamo: output and input gradient equal eager's. Under
    torch 2.11 (the GPU machine's) its in-place output scaling made the compiled input gradient wrong (max error
    2.4 on N(0, 1) rows), and with it every LoRA gradient upstream of a norm; torch 2.13 traced it right."""
    from model.llama import RMSNorm

    torch._dynamo.reset()
    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(False)  # frozen, as in a LoRA model
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 5, 16, dtype=dtype)
    eager = norm(x)
    (ge,) = torch.autograd.grad(eager, x, g)
    compiled = torch.compile(norm, backend="aot_eager", dynamic=True)(x)  # dynamic, as Block.set_compiled
    (gc,) = torch.autograd.grad(compiled, x, g)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    torch.testing.assert_close(gc, ge)


def test_the_norm_scales_in_place_only_when_not_compiled(monkeypatch):
    """What the test above guards under torch 2.11, checked under any torch: traced by the compiler
    (torch.compiler.is_compiling()), the norm's forward calls no in-place op; eagerly it scales its own output
    in place (one tensor fewer)."""
    from torch.overrides import TorchFunctionMode

    from model.llama import RMSNorm

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    norm = RMSNorm(16, 1e-5)
    norm.weight.requires_grad_(False)
    x = torch.randn(3, 16, requires_grad=True)
    in_place = lambda names: [n for n in names if n.endswith("_") and not n.startswith("_")]  # noqa: E731
    with Calls() as eager:
        norm(x)
    assert in_place(eager.names) == ["mul_"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with Calls() as traced:
        norm(x)
    assert in_place(traced.names) == [] and "mul" in traced.names
