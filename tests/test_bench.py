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
    rc = bench.main(["--model-config", str(tiny_json), "--seq-len", "32", "--batch-size", "2", "--steps", "1",
                     "--warmup", "0", "--rounds", "1", "--device", "cpu", "--vs", "hf", "--json", str(out),
                     "--allocator", "ours-only"])
    assert rc == 0
    rep = json.loads(out.read_text())
    for side in ("ours", "hf"):
        r = rep["results"][side]
        assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert len(rep["raw"][side][0]["losses"]) == 1
    assert set(rep["ratios"]) >= {"tokens_per_s", "peak_rss"}
    if bench._glibc_heap() is not None:  # glibc's heap account, read in each child after its last step
        heap = rep["results"]["ours"]["glibc_heap"]
        assert 0 <= heap["heap_free_bytes"] <= heap["heap_bytes"]
    # ours-only: the engine's CPU allocator setting on our side, PyTorch's default on the HF side
    assert rep["raw"]["ours"][0]["allocator_env"] == "1" and rep["raw"]["hf"][0]["allocator_env"] == "0"
    text = capsys.readouterr().out
    assert "ours/hf tokens_per_s" in text
    assert "CPU allocator: ours THP_MEM_ALLOC_ENABLE=1, hf THP_MEM_ALLOC_ENABLE=0" in text


def test_both_sides_start_from_the_same_loss_scale(tiny_json, tmp_path):
    """Random init at the same shapes: both first losses are near ln(vocab), so both train the same task."""
    out = tmp_path / "bench.json"
    assert bench.main(["--model-config", str(tiny_json), "--seq-len", "32", "--batch-size", "1", "--steps", "1",
                       "--warmup", "0", "--rounds", "1", "--device", "cpu", "--vs", "none", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert "hf" not in rep["results"]
    assert rep["raw"]["ours"][0]["allocator_env"] == "1"  # --allocator same: the engine's setting
    loss = rep["raw"]["ours"][0]["losses"][0]
    assert abs(loss - __import__("math").log(320)) < 0.5


@pytest.mark.parametrize("args", [["--device", "cuda"], ["--answer-frac", "0"], ["--model-config", "/nope.json"]])
def test_bad_arguments_are_one_line_errors(args, capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert bench.main(["--seq-len", "16", "--vs", "none", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engine.bench: error:") and "\n" not in err
