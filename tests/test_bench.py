"""engine/bench.py runs end to end on the CPU (tiny shapes, one step each side); no speed or memory ratio is
asserted here: those are benchmark results, recorded in BENCHMARKS.md."""
import json

import pytest

from engine import bench

from .conftest import tiny_config_dict


@pytest.fixture
def tiny_json(tmp_path):
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(tiny_config_dict()))
    return p


def test_bench_against_hf_runs_end_to_end_on_cpu(tiny_json, tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "bench.json"
    rc = bench.main(["--model", str(tiny_json), "--seq-len", "32", "--batch-size", "2", "--steps", "1",
                     "--warmup", "0", "--rounds", "1", "--device", "cpu", "--vs", "hf", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    for side in ("ours", "hf"):
        r = rep["results"][side]
        assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert len(rep["raw"][side][0]["losses"]) == 1
        # equal random rows: every position counts, over the median step time
        assert r["tokens_per_s"] == pytest.approx(32 * 2 / r["median_step_seconds"])
        assert rep["raw"][side][0]["step_tokens"] == [64]
    assert set(rep["ratios"]) >= {"tokens_per_s", "peak_rss"}
    # the same model on the same rows: both first losses agree (measured 5.7691422 vs 5.7691417), so both sides
    # time the same work
    ours, hf = rep["raw"]["ours"][0]["losses"][0], rep["raw"]["hf"][0]["losses"][0]
    assert ours == pytest.approx(hf, rel=1e-5)
    text = capsys.readouterr().out
    assert "ours/hf tokens_per_s" in text


def test_bench_alone_runs_without_the_hf_stack(tiny_json, tmp_path):
    """--vs none: our side only (no transformers needed); random init, so the first loss is near ln(vocab)."""
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(tiny_json), "--seq-len", "32", "--batch-size", "1", "--steps", "1",
                       "--warmup", "0", "--rounds", "1", "--device", "cpu", "--vs", "none", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert "hf" not in rep["results"]
    loss = rep["raw"]["ours"][0]["losses"][0]
    assert abs(loss - __import__("math").log(320)) < 0.5


@pytest.mark.parametrize("args", [["--device", "cuda"], ["--answer-frac", "0"], ["--model", "/nope.json"]])
def test_bad_arguments_are_one_line_errors(args, capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert bench.main(["--seq-len", "16", "--vs", "none", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engine.bench: error:") and "\n" not in err


def test_the_old_model_config_spelling_still_works_with_a_notice(tiny_json, capsys):
    args = bench.build_parser().parse_args(["--model-config", str(tiny_json)])
    assert args.model == str(tiny_json)
    assert "--model-config is deprecated, use --model" in capsys.readouterr().err


def test_packed_rows_from_data_are_the_same_for_both_sides_and_survive_save_rows(tmp_path, capsys):
    """--data: rows as engine.train packs them; both sides train on the same micro-batches (same real-token
    counts, step by step, and the same losses: the same NF4 base at step 0, and HF's padding-free path keeps the
    examples apart as ours does). --save-rows writes them; --data rows:FILE reads them back unchanged."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from tests.test_calibrate import _paragraph_data
    from tests.test_evaluate import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model")
    spec = _paragraph_data(tmp_path / "d.jsonl")
    common = ["--model", str(model), "--tokenizer", str(model), "--seq-len", "1024", "--batch-size", "2",
              "--steps", "2", "--warmup", "0", "--rounds", "1", "--device", "cpu", "--precision", "fp32"]
    assert bench.main([*common, "--data", spec, "--vs", "hf", "--json", str(tmp_path / "a.json")]) == 0
    rep = json.loads((tmp_path / "a.json").read_text())
    assert rep["rows"]["kind"].startswith("packed rows of " + spec) and 0 < rep["rows"]["fill"] <= 1
    ours, hf = rep["raw"]["ours"][0], rep["raw"]["hf"][0]
    assert ours["step_tokens"] == hf["step_tokens"] and ours["step_tokens"][0] != ours["step_tokens"][1]
    assert ours["step_tokens"][0] < 2 * 1024  # real tokens, not the padded row
    assert ours["losses"] == pytest.approx(hf["losses"], abs=1e-4)
    for side in ("ours", "hf"):
        r = rep["results"][side]
        assert r["tokens_per_s"] == pytest.approx(sum(rep["raw"][side][0]["step_tokens"]) /
                                                  sum(rep["raw"][side][0]["step_seconds"]))
        assert r["mfu"] == pytest.approx(r["model_tflops"] / rep["matmul_peak_tflops"]) and r["mfu"] > 0
    assert "rows: packed rows of" in capsys.readouterr().out

    rows = tmp_path / "rows.safetensors"
    assert bench.main([*common, "--data", spec, "--save-rows", str(rows)]) == 0
    assert f"--data rows:{rows}" in capsys.readouterr().out
    assert bench.main([*common, "--data", f"rows:{rows}", "--vs", "none", "--json", str(tmp_path / "b.json")]) == 0
    again = json.loads((tmp_path / "b.json").read_text())["raw"]["ours"][0]
    assert again["step_tokens"] == ours["step_tokens"] and again["losses"] == pytest.approx(ours["losses"], abs=1e-6)
    bs = common[common.index("--batch-size") + 1] if "--batch-size" in common else "2"
    other = ["--batch-size", str(int(bs) + 1)]
    assert bench.main([*common, *other, "--data", f"rows:{rows}", "--vs", "none"]) != 0  # rows of another batch size
    assert f"pass --batch-size {bs}" in capsys.readouterr().err


def test_a_bad_rows_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "rows.safetensors"
    bad.write_bytes(b"not safetensors")
    assert bench.main(["--seq-len", "16", "--vs", "none", "--data", f"rows:{bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engine.bench: error:") and str(bad) in err and "--save-rows" in err and "\n" not in err
    assert bench.main(["--seq-len", "16", "--vs", "none", "--save-rows", str(bad)]) == 2
    assert "--save-rows needs --data" in capsys.readouterr().err


def test_gpu_kernels_are_sorted_into_the_kinds_issue_14_asks_about():
    """Kernel names as the CUDA profiler reports them (cuBLAS, cuBLASLt's nvjet, CUTLASS-based attention,
    bitsandbytes, PyTorch's fused AdamW, copies, inductor, PyTorch's elementwise and reduction kernels)."""
    kinds = {
        "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas": "matmul",
        "nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NTT": "matmul",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>, true>(Flash_fwd_params)":
            "attention",
        "fmha_cutlassB_f16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<>::Params)":
            "attention",
        "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, int, int)":
            "NF4 dequantize",
        "void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>, FusedAdamMathFunctor>":
            "optimizer and clipping",
        "Memcpy HtoD (Pinned -> Device)": "copy / fill",
        "triton_poi_fused__to_copy_add_mul_0": "compiled (triton)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float, Mul>>":
            bench.OTHER_KIND,
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps<float, float>>>": bench.OTHER_KIND,
    }
    for name, kind in kinds.items():
        assert bench.kernel_kind(name) == kind, name
    split, top = bench.kernel_split([("nvjet_a", 0.5), ("elementwise_kernel<Mul>", 0.25), ("nvjet_a", 0.5),
                                     ("Memset (Device)", 0.125)], top=2)
    assert split == {"matmul": 1.0, bench.OTHER_KIND: 0.25, "copy / fill": 0.125}
    assert top == [["nvjet_a", 1.0, 2], ["elementwise_kernel<Mul>", 0.25, 1]]
    assert bench.format_kinds(split).startswith("matmul 73% (1000.0 ms), ")


def test_gpu_busy_time_is_the_union_of_device_intervals():
    assert bench.busy_seconds([]) == 0
    assert bench.busy_seconds([(0, 2), (1, 3), (5, 6)]) == 4  # overlap counted once, the idle gap not at all
    assert bench.busy_seconds([(5, 6), (0, 10)]) == 10  # nested, out of order


def test_model_flops_count_the_seven_projections_of_llama_3_2_3b():
    """FACTS.md's definition at Llama 3.2 3B shapes (28 blocks, hidden 3072, 24/8 heads of 128, MLP 8192), by
    hand: 6 x 2.82 G per token with checkpointing, 4 x without."""
    from model.load import load_config

    cfg = load_config("llama-3.2-3b")
    per_block = 3072 * 3072 * 2 + 3072 * 1024 * 2 + 3 * 3072 * 8192
    assert bench.model_flops_per_token(cfg) == 6 * 28 * per_block
    assert bench.model_flops_per_token(cfg, checkpointing=False) == 4 * 28 * per_block
    assert 2.81e9 < 28 * per_block < 2.83e9
