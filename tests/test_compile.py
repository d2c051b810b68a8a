"""--compile (model.llama.Block.set_compiled): torch.compile around each block's attention gives the eager
path's logits, loss and LoRA gradients, on packed rows (attention stays eager on the segment path) and plain
rows, with checkpointing recomputing the compiled parts in backward, and the trainer's config switches it on."""
import shutil

import pytest
import torch

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
