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
    assert set(rep["ratios"]) >= {"tokens_per_s", "peak_rss"}
    text = capsys.readouterr().out
    assert "ours/hf tokens_per_s" in text


def test_both_sides_start_from_the_same_loss_scale(tiny_json, tmp_path):
    """Random init at the same shapes: both first losses are near ln(vocab), so both train the same task."""
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
