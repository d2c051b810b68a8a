"""engine/bench.py runs end to end on the CPU (tiny shapes, one step each side); no speed or memory ratio is
asserted here: those are benchmark results, recorded in BENCHMARKS.md. Two real runs are shared by the tests that
read their report (module fixtures); the parent's handling of what a child reports (out of memory, losses that
differ) is tested with stand-in children."""
import contextlib
import io
import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from engine import bench

from .conftest import tiny_config_dict


def _tiny_json(path):
    path.write_text(json.dumps(tiny_config_dict()))
    return path


@pytest.fixture
def tiny_json(tmp_path):
    return _tiny_json(tmp_path / "tiny.json")


def _main(argv) -> tuple[int, str]:
    """bench.main(argv) -> (exit code, what the parent printed)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench.main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """One run against the HF stack at tiny shapes: (report, printed text)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    tmp = tmp_path_factory.mktemp("hf_run")
    out = tmp / "bench.json"
    rc, text = _main(["--model", str(_tiny_json(tmp / "tiny.json")), "--seq-len", "32", "--batch-size", "2",
                      "--steps", "1", "--warmup", "0", "--rounds", "1", "--device", "cpu", "--vs", "hf",
                      "--json", str(out)])
    assert rc == 0
    return json.loads(out.read_text()), text


@pytest.fixture(scope="module")
def alone_run(tmp_path_factory):
    """One run of our side alone, with the flags that change it: (report, printed text)."""
    tmp = tmp_path_factory.mktemp("alone_run")
    out = tmp / "bench.json"
    rc, text = _main(["--model", str(_tiny_json(tmp / "tiny.json")), "--seq-len", "32", "--batch-size", "1",
                      "--steps", "1", "--warmup", "0", "--rounds", "1", "--device", "cpu", "--vs", "none",
                      "--no-trim-cpu-heap", "--mlp-tile", "16", "--json", str(out)])
    assert rc == 0
    return json.loads(out.read_text()), text


def test_bench_against_hf_runs_end_to_end_on_cpu(hf_run):
    rep, text = hf_run
    for side in ("ours", "hf"):
        r = rep["results"][side]
        assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert len(rep["raw"][side][0]["losses"]) == 1
        # equal random rows: every position counts, over the median step time
        assert r["tokens_per_s"] == pytest.approx(32 * 2 / r["median_step_seconds"])
        assert rep["raw"][side][0]["step_tokens"] == [64]
    assert set(rep["ratios"]) >= {"tokens_per_s", "peak_rss"}
    # the same model on the same rows: both first losses agree (measured 5.7692722 vs 5.7692732), so both sides
    # time the same work
    ours, hf = rep["raw"]["ours"][0]["losses"][0], rep["raw"]["hf"][0]["losses"][0]
    assert ours == pytest.approx(hf, rel=1e-5)
    assert "ours/hf tokens_per_s" in text


def test_both_sides_read_the_same_bf16_checkpoint_through_their_own_loaders(hf_run):
    """Review finding: the HF side read a checkpoint file (its pages counted in its peak RSS) while ours built
    random weights in place. Now both read the one file the parent wrote, in bf16 as Llama 3.2 and SmolLM2 are
    published, each through its own loader, and compute in the precision they did before (fp32 on the CPU)."""
    rep, text = hf_run
    ck = rep["checkpoint"]
    assert ck["dtype"] == "bfloat16" and ck["loaded_as"] == "fp32" and ck["bytes"] > 0
    ours, hf = rep["raw"]["ours"][0]["weights"], rep["raw"]["hf"][0]["weights"]
    assert ours == f"{ck['path']} via model.load.load_model"
    assert hf == f"{ck['path']} via transformers.LlamaForCausalLM.from_pretrained"
    assert rep["raw"]["ours"][0]["setup"]["precision"] == "fp32"
    assert "weights: one random checkpoint (bfloat16 safetensors" in text


def test_peak_anonymous_memory_is_reported_beside_peak_rss_with_a_ratio_each(hf_run):
    rep, text = hf_run
    for side in ("ours", "hf"):
        r = rep["results"][side]
        assert 0 < r["peak_anon_bytes"] <= r["peak_rss_bytes"]
        assert rep["raw"][side][0]["anon_samples"] >= 1
    o, h = rep["results"]["ours"], rep["results"]["hf"]
    assert rep["ratios"]["peak_anon"] == pytest.approx(o["peak_anon_bytes"] / h["peak_anon_bytes"])
    assert rep["ratios"]["peak_rss"] == pytest.approx(o["peak_rss_bytes"] / h["peak_rss_bytes"])
    assert "ours/hf peak_rss: " in text and "[peak RSS (VmHWM: whole resident set" in text
    assert "ours/hf peak_anon: " in text and "[peak anon (RssAnon high-water" in text


def test_the_hf_side_steps_the_same_adamw_as_ours_fused_on_cuda(hf_run):
    """HF Trainer's default for torch >= 2.8 is the fused AdamW, ours is fused on CUDA too; on the CPU both run
    the per-parameter loop engine.step.make_optimizer runs there. Each side's optimizer is in the report."""
    rep, text = hf_run
    assert bench.hf_adamw_kwargs(torch.device("cuda")) == {"fused": True}
    assert bench.hf_adamw_kwargs(torch.device("cpu")) == {"foreach": False}
    ours, hf = rep["results"]["ours"]["optimizer"], rep["results"]["hf"]["optimizer"]
    assert ours == hf and ours.startswith("AdamW per-parameter loop (foreach=False), lr 0.0002")
    assert "ours: compile off" in text and f"optimizer {ours}" in text and "hf:   transformers" in text


def test_report_records_the_stack_versions_the_commit_and_the_first_loss_check(hf_run):
    import bitsandbytes
    import peft
    import transformers

    rep, text = hf_run
    v = rep["versions"]
    assert (v["transformers"], v["peft"], v["bitsandbytes"]) == (transformers.__version__, peft.__version__,
                                                                  bitsandbytes.__version__)
    assert f"transformers {transformers.__version__}, peft {peft.__version__}" in text
    assert "commit" in rep  # None outside a git checkout
    check = rep["first_loss_check"]
    assert check["ok"] and check["tolerance"] == bench.LOSS_RTOL["fp32"] and check["max_relative_difference"] < 1e-5
    assert "first-step loss: ours " in text and "the same computation" in text


def test_utilisation_is_labelled_model_4p_and_hardware_6p(hf_run):
    """Review finding: 'MFU' counted 6P per token (the checkpointed recompute included): hardware FLOPs. Now MFU
    counts the model's 4P, HFU the 6P, the formula is printed; the old keys keep their old (6P) meaning."""
    rep, text = hf_run
    fl, peak = rep["flops_per_token"], rep["matmul_peak_tflops"]
    assert fl["hardware_6p"] * 2 == fl["model_4p"] * 3 == 12 * fl["projection_params"]
    for side in ("ours", "hf"):
        r = rep["results"][side]
        assert r["mfu_4p"] == pytest.approx(r["tokens_per_s"] * fl["model_4p"] / 1e12 / peak)
        assert r["hfu_6p"] == pytest.approx(1.5 * r["mfu_4p"])
        assert (r["mfu"], r["model_tflops"]) == (r["hfu_6p"], r["hardware_tflops_6p"])
    assert rep["model_flops_per_token"] == fl["hardware_6p"]
    assert "MFU counts model FLOPs 4P" in text and "HFU hardware FLOPs 6P" in text
    assert f"matmul peak {peak:.3g} TFLOP/s" in text and "MFU 4P" in text and "HFU 6P" in text


def test_bench_alone_runs_without_the_hf_stack(alone_run):
    """--vs none: our side only (no transformers needed); random init, so the first loss is near ln(vocab)."""
    rep, _ = alone_run
    assert "hf" not in rep["results"] and "first_loss_check" not in rep
    loss = rep["raw"]["ours"][0]["losses"][0]
    assert abs(loss - math.log(320)) < 0.5
    assert rep["raw"]["ours"][0]["weights"].endswith("via model.load.load_model")  # the same file as with --vs hf


def test_the_report_prints_the_command_and_the_settings_that_change_ours(alone_run):
    rep, text = alone_run
    assert rep["trim_cpu_heap"] is False and rep["mlp_tile"] == 16
    assert "command: python -m engine.bench --model " in text and "--no-trim-cpu-heap --mlp-tile 16" in text
    assert "ours: compile off, CPU heap trim off (--no-trim-cpu-heap), MLP tile 16, loss chunk " in text
    assert rep["raw"]["ours"][0]["setup"]["mlp_tile"] == 16 and not rep["raw"]["ours"][0]["setup"]["trim_cpu_heap"]


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
    assert bench.rows_metadata(rows)["seq_len"] == "1024"  # what --data rows:FILE later holds --seq-len to
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


# ------------------------------------------------------------------------------ review findings, without a real run
def _rows(width: int, n: int = 2, batch: int = 2) -> list[dict]:
    ids = torch.arange(batch * width).reshape(batch, width) % 300
    return [{"input_ids": ids.clone(), "labels": ids.clone(),
             "position_ids": torch.arange(width).expand(batch, width).contiguous(),
             "segment_ids": torch.zeros(batch, width, dtype=torch.long)} for _ in range(n)]


@pytest.mark.parametrize("meta, says", [({"kind": "older file, no seq_len"}, "rows are 32 tokens wide, not --seq-len "
                                         "64; pass --seq-len 32"),
                                        ({"kind": "k", "seq_len": "48"}, "built for --seq-len 48 (up to 32 tokens "
                                         "wide), not 64; pass --seq-len 48")])
def test_rows_not_built_for_seq_len_are_refused(meta, says, tiny_json, tmp_path, capsys):
    """Review finding: a rows file narrower than --seq-len ran, and the report stated --seq-len and a fill
    computed over it. Its width (or the seq_len it records) must now equal --seq-len."""
    f = bench.save_rows(_rows(32), tmp_path / "rows.safetensors", meta)
    assert bench.main(["--model", str(tiny_json), "--seq-len", "64", "--batch-size", "2", "--steps", "1",
                       "--warmup", "0", "--rounds", "1", "--device", "cpu", "--vs", "none",
                       "--data", f"rows:{f}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engine.bench: error:") and str(f) in err and says in err and "\n" not in err


def test_rows_file_metadata_is_carried_into_the_report(tiny_json, tmp_path):
    f = bench.save_rows(_rows(32), tmp_path / "rows.safetensors", {"kind": "k", "seq_len": 32, "fill": 0.5})
    args = bench.build_parser().parse_args(["--model", str(tiny_json), "--seq-len", "32", "--batch-size", "2",
                                            "--steps", "1", "--warmup", "0", "--data", f"rows:{f}"])
    path, meta = bench._rows_for(args, bench.load_config(str(tiny_json)), tmp_path)
    assert meta["file_metadata"] == {"kind": "k", "seq_len": "32", "fill": "0.5"} and meta["width"] == 32
    assert meta["fill"] == 1.0  # every position of these rows is a real token


def _fake_child(loss: float = 5.0) -> dict:
    """A child's result as _time_steps writes it, for the parent's own logic."""
    return {"step_seconds": [1.0], "step_cpu_seconds": [1.0], "losses": [loss], "profile": None,
            "step_tokens": [64], "peak_rss_bytes": 1 << 30, "train_peak_rss_bytes": 1 << 30,
            "peak_anon_bytes": 1 << 29, "train_peak_anon_bytes": 1 << 29, "optimizer": "AdamW (stand-in)"}


def _parent_args(tiny_json, tmp_path, rounds: int = 1):
    return ["--model", str(tiny_json), "--seq-len", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0",
            "--rounds", str(rounds), "--device", "cpu", "--vs", "hf", "--json", str(tmp_path / "r.json")]


def test_first_step_losses_that_differ_fail_the_run(tiny_json, tmp_path, monkeypatch, capsys):
    """Review finding: nothing checked that both sides compute the same thing. Their first-step losses (same
    weights, same rows) may differ by rounding only; beyond LOSS_RTOL the run prints its report, flags it and
    fails."""
    monkeypatch.setattr(bench, "missing_hf_packages", lambda: [])
    monkeypatch.setattr(bench, "_run_child", lambda args, which, out, ckpt: _fake_child(5.0 if which == "ours"
                                                                                       else 5.01))
    assert bench.main(_parent_args(tiny_json, tmp_path)) == 1
    cap = capsys.readouterr()
    assert "MISMATCH, the two sides do not compute the same thing" in cap.out
    assert cap.err.startswith("engine.bench: error: first-step losses differ beyond fp32 rounding")
    check = json.loads((tmp_path / "r.json").read_text())["first_loss_check"]
    assert not check["ok"] and check["max_relative_difference"] == pytest.approx(0.01 / 5.01)
    assert bench.LOSS_RTOL["fp32"] < bench.LOSS_RTOL["bf16"] == bench.LOSS_RTOL["fp16"] < 0.01


def test_an_hf_out_of_memory_still_reports_ours_and_marks_hf(tiny_json, tmp_path, monkeypatch, capsys):
    """Review finding: an HF run that ran out of memory discarded everything. Ours is reported, HF marked OOM,
    no ratio, the run succeeds (that HF does not fit is a result), and HF is not run again."""
    calls = []

    def child(args, which, out, ckpt):
        calls.append(which)
        return _fake_child() if which == "ours" else {"oom": True, "error": "OutOfMemoryError: CUDA out of memory"}

    monkeypatch.setattr(bench, "missing_hf_packages", lambda: [])
    monkeypatch.setattr(bench, "_run_child", child)
    assert bench.main(_parent_args(tiny_json, tmp_path, rounds=2)) == 0
    assert calls == ["ours", "hf", "ours"]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert set(rep["results"]) == {"ours"} and rep["oom"] == {"hf": "OutOfMemoryError: CUDA out of memory"}
    assert "ratios" not in rep and "first_loss_check" not in rep
    out = capsys.readouterr().out
    assert "hf     out of memory: OutOfMemoryError" in out and "no ours/hf ratios: hf ran out of memory" in out


def test_a_child_that_runs_out_of_memory_says_so_instead_of_failing(tiny_json, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "run_hf", oom)
    out = tmp_path / "child.json"
    assert bench.main(["--child", "hf", "--child-out", str(out), "--checkpoint", str(tmp_path), "--model",
                       str(tiny_json), "--seq-len", "32", "--batch-size", "1", "--device", "cpu"]) == 3
    assert json.loads(out.read_text()) == {"oom": True, "error": "OutOfMemoryError: CUDA out of memory. Tried to "
                                                                 "allocate 2.00 GiB"}


def test_a_child_killed_by_the_oom_killer_counts_as_out_of_memory(tiny_json, tmp_path, monkeypatch):
    args = bench.build_parser().parse_args(["--model", str(tiny_json), "--seq-len", "32"])
    args.rows_file = None
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, -9))
    res = bench._run_child(args, "hf", tmp_path / "none.json", None)
    assert res["oom"] and "SIGKILL" in res["error"]
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(RuntimeError, match="the hf run failed"):
        bench._run_child(args, "hf", tmp_path / "none.json", None)


def test_a_missing_hf_package_is_named_before_any_run(tiny_json, monkeypatch, capsys):
    """Review finding: without peft, ours ran first and the hf child then died with a traceback."""
    real = bench.find_spec
    monkeypatch.setattr(bench, "find_spec", lambda name: None if name == "peft" else real(name))
    monkeypatch.setattr(bench, "parent", lambda args: pytest.fail("a run started"))
    assert bench.main(["--model", str(tiny_json), "--seq-len", "16", "--device", "cpu", "--vs", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("engine.bench: error: --vs hf needs peft (the HF stack it compares against): "
                   "pip install -e '.[bench]', or pass --vs none")


def test_a_transformers_older_than_the_bench_pin_is_named_before_any_run(tiny_json, monkeypatch, capsys):
    """transformers < 4.56 has no from_pretrained(dtype=): the hf side would load the bf16 checkpoint in bf16."""
    monkeypatch.setattr(bench, "find_spec", lambda name: object())
    monkeypatch.setattr(bench, "_installed_version", lambda pkg: "4.45.0" if pkg == "transformers" else "0.21.2")
    monkeypatch.setattr(bench, "parent", lambda args: pytest.fail("a run started"))
    assert bench.main(["--model", str(tiny_json), "--seq-len", "16", "--device", "cpu", "--vs", "hf"]) == 2
    assert "--vs hf needs transformers >= 4.56 (found 4.45.0)" in capsys.readouterr().err


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc")
def test_peak_rss_covers_training_when_the_high_water_mark_cannot_be_reset(monkeypatch):
    """Review finding: where /proc/self/clear_refs refuses the reset, the training steps dropped out of 'peak RSS'
    (only the mark read before them was kept). The mark is now read again at the end, whatever the reset did."""
    monkeypatch.setattr(bench, "_reset_hwm", lambda: False)
    seen = {}

    def step(i):
        # resident above this process's earlier high-water mark, so only a mark read after the step covers it
        n = _status_kib("VmHWM") - _status_kib("VmRSS") + (64 << 20)
        x = torch.ones(n // 4)
        seen["rss"] = _status_kib("VmRSS")
        return float(x[0]) * 0

    r = bench._time_steps(step, torch.device("cpu"), 1, 0, lambda msg: None)
    # (the kernel's RSS counters lag by up to a few hundred KiB: the step put 64 MiB above the earlier mark)
    assert r["peak_rss_bytes"] >= seen["rss"] - (8 << 20) and r["train_peak_rss_bytes"] is None and not r["hwm_reset"]


def _anon_now() -> int:
    fields = open("/proc/self/statm").read().split()  # pages: size resident shared ...
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux /proc")
def test_anon_peak_keeps_memory_freed_before_it_is_read():
    anon = bench.AnonPeak.start(period=0.001)
    base = _anon_now()
    x = torch.ones(48 << 18)  # 48 MiB of anonymous memory, touched
    time.sleep(0.05)  # the sampler (another process) reads it
    del x  # freed (a block this large is its own mapping) before the peak is read
    assert _anon_now() < base + (40 << 20)
    assert anon.restart() >= base + (40 << 20)  # the peak so far
    assert anon.stop() < base + (40 << 20) and anon.samples > 2  # and since the restart


def test_a_json_report_that_cannot_be_written_is_named_before_any_run(tiny_json, tmp_path, monkeypatch, capsys):
    """--json into a missing or unwritable place was found only after the whole benchmark, with a traceback."""
    monkeypatch.setattr(bench, "parent", lambda args: pytest.fail("a run started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for where in (blocker / "b.json", tmp_path):  # a file in the way of its directory; a directory, not a file
        assert bench.main(["--model", str(tiny_json), "--seq-len", "16", "--device", "cpu", "--vs", "none",
                           "--json", str(where)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("engine.bench: error: ") and "--json" in err and "\n" not in err, err


def test_a_json_report_that_fails_to_write_keeps_the_printed_report_and_no_torn_file(tiny_json, tmp_path,
                                                                                      monkeypatch, capsys):
    """A full disk at the end: the figures are printed, the error is one line, and no half-written file (nor an
    earlier report cut to nothing) is left under the name."""
    out = tmp_path / "b.json"
    out.write_text('{"earlier": "report"}')
    monkeypatch.setattr(bench, "parent", lambda args: {"report": "stub"})
    monkeypatch.setattr(bench, "format_report", lambda rep: "REPORT")

    real = Path.write_bytes

    def full(self, data):  # half the bytes land, then the disk is full
        real(self, data[:len(data) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", full)
    assert bench.main(["--model", str(tiny_json), "--seq-len", "16", "--device", "cpu", "--vs", "none",
                       "--json", str(out)]) == 2
    cap = capsys.readouterr()
    assert cap.out.strip() == "REPORT" and "No space left on device" in cap.err and str(out) in cap.err
    assert out.read_text() == '{"earlier": "report"}'
