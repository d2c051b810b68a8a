"""engine.report: report.md tables, PNGs it references, the loss curve, and the tables-only fallback."""
import json
import re

import pytest

from engine import report
from engine.metrics import score, summarize


def _result():
    pairs = [("Term", "a b c", "a b c"), ("Term", "a b", "a b c"), ("Law", "NONE", "NONE"), ("Law", "x", "NONE")]
    rows = [{"id": f"e{i}", "category": c, "source": "synthetic", "prediction": p, "answer": a, "scores": score(p, a)}
            for i, (c, p, a) in enumerate(pairs)]
    return {"model": "tiny", "adapter": None, "data": "synthetic", "split": "test", **summarize(rows), "rows": rows}


def _images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_report_references_existing_pngs_and_loss_curve(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "loss": 2.0 / s, "lr": 1e-4}) for s in range(1, 6))
                       + "\n" + json.dumps({"step": 5, "eval_avg_similarity": 40.0}) + "\n{\"step\": 6, \"lo")
    md_path = report.write_report(_result(), tmp_path / "out", metrics_jsonl=metrics)
    md = md_path.read_text()
    images = _images(md)
    assert set(images) == {"similarity_hist.png", "categories.png", "loss.png"}
    for name in images:
        assert (md_path.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Term |" in md and "| synthetic |" in md
    assert not list(md_path.parent.glob(".*"))  # no temporary files left behind
    assert md_path.stat().st_mode & 0o044 == (md_path.parent / "loss.png").stat().st_mode & 0o044


def test_report_without_matplotlib_is_tables_only(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    md = report.write_report(_result(), tmp_path).read_text()
    assert _images(md) == [] and "matplotlib is not installed" in md
    assert "## By category" in md and not list(tmp_path.glob("*.png"))


def test_compare_table_rows_and_changes():
    before = {"overall": {"n": 4, "avg_similarity": 20.0, "excellent": 0.0, "good": 25.0, "exact_match": 0.0,
                          "f1": 10.0, "abstention_precision": None, "abstention_recall": 0.0}}
    after = {"overall": {**before["overall"], "avg_similarity": 75.5, "abstention_precision": 50.0}}
    table = report.compare_table(before, after)
    lines = table.strip().splitlines()
    assert lines[0] == "| examples | metric | before | after | change |"
    assert "| all | avg similarity (0-100) | 20.0 | 75.5 | +55.5 |" in lines
    assert "| all | NONE precision % | - | 50.0 | - |" in lines
    assert "| all | exact match % | 0.0 | 0.0 | +0.0 |" in lines


def test_compare_table_and_report_show_clause_and_none_examples_apart(tmp_path, monkeypatch):
    res = _result()
    table = report.compare_table(res, res)
    assert "| clause | avg similarity (0-100) | 87.5 | 87.5 | +0.0 |" in table  # 100 and 75 ("a b" of "a b c")
    assert "| none | answered NONE % | 50.0 | 50.0 | +0.0 |" in table          # NONE and "x" for NONE
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    md = report.write_report(res, tmp_path).read_text()
    assert "| clause |" in md and "| none |" in md and "| all |" in md


def test_text_histogram_counts_each_bin_and_puts_100_in_the_last():
    from engine.report import text_histogram

    out = text_histogram([100.0, 95.0, 90.0, 89.9, 0.0], before=[10.0, 10.0], step=10, width=4)
    lines = out.splitlines()
    assert lines[0].split() == ["similarity", "before", "after"] and len(lines) == 11
    counts = {ln.split()[0]: [int(t) for t in ln.split()[1:] if t.isdigit()] for ln in lines[1:]}
    assert counts["90-100"] == [0, 3] and counts["80-90"] == [0, 1] and counts["0-10"] == [0, 1]
    assert counts["10-20"] == [2, 0]
    assert "████ 3" in out  # the largest count gets the full width


def test_metrics_jsonl_skips_only_the_line_a_live_run_is_writing(tmp_path):
    good = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    path = tmp_path / "metrics.jsonl"
    path.write_text(good + '{"step": 3, "lo')  # torn: the run is writing it
    assert [r["step"] for r in report.read_metrics_jsonl(path)] == [1, 2]
    for bad, line in ((good + "not json\n", 3), ("# a README\n" + good, 1), (good + "[1, 2]\n", 3)):
        path.write_text(bad)
        with pytest.raises(ValueError, match=rf"metrics.jsonl:{line}: not a JSON"):
            report.read_metrics_jsonl(path)


def test_report_counts_answers_cut_at_max_new_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    md = report.write_report({**_result(), "truncated": 2, "max_new_tokens": 64}, tmp_path / "cut").read_text()
    assert "**2 answers cut at --max-new-tokens** (no stop token within 64 tokens" in md
    md = report.write_report({**_result(), "truncated": 0}, tmp_path / "whole").read_text()
    assert "cut at --max-new-tokens" not in md
