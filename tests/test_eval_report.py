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


def test_text_histogram_bins_hold_their_upper_edge_and_leave_empty_bins_out():
    """Bins are right-closed, as "excellent" (> 90) counts: an exact 90 is in (80,90], 100 in (90,100], 0 and 10 in
    [0,10]; a bin empty in every column is not printed (the README's histogram says "empty bins left out")."""
    from engine.report import text_histogram

    out = text_histogram([100.0, 95.0, 90.0, 89.9, 0.0], before=[10.0, 10.0, 90.5], step=10, width=4)
    lines = out.splitlines()
    assert lines[0].split() == ["similarity", "before", "after"]
    counts = {ln.split()[0]: [int(t) for t in ln.split()[1:] if t.isdigit()] for ln in lines[1:]}
    assert counts == {"[0,10]": [2, 1], "(80,90]": [0, 2], "(90,100]": [1, 2]}
    assert "████ 2" in out  # the largest count gets the full width
    assert sum(counts["(90,100]"]) == 3 == sum(x > 90 for x in [100.0, 95.0, 90.0, 89.9, 0.0, 10.0, 10.0, 90.5])


def test_print_results_histogram_says_it_leaves_empty_bins_out(capsys):
    res = _result()
    report.print_results(res, res)
    out = capsys.readouterr().out
    assert "similarity on clause examples, before and after (2 clause examples; empty bins left out)" in out
    assert "(70,80]" in out and "(90,100]" in out and "(10,20]" not in out  # "a b" of "a b c" scores 75
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


def _saved_figures(monkeypatch):
    """The figures report._save is given, kept open for the test to read (the PNG files are still written)."""
    saved = []

    def save(fig, plt, path):
        saved.append(fig)
        with report.atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    monkeypatch.setattr(report, "_save", save)
    return saved


def test_similarity_png_bins_hold_their_upper_edge(tmp_path, monkeypatch):
    """The PNG's 5-wide bins count as the text histogram and "excellent" do: an exact 90 in the bar left of the
    90 line, 90.5 right of it."""
    pytest.importorskip("matplotlib")
    saved = _saved_figures(monkeypatch)
    report.plot_similarity_hist(report._pyplot(), [90.0, 90.5, 100.0, 0.0], tmp_path / "h.png")
    bars = {round(p.get_x()): p.get_height() for p in saved[0].axes[0].patches}
    assert bars[85] == 1 and bars[90] == 1 and bars[95] == 1 and bars[0] == 1 and sum(bars.values()) == 4


def _mixed_result():
    """One category ("Law") with a clause example quoted wrong and two NONE examples answered NONE."""
    pairs = [("Law", "Delaware.", "New York law governs."), ("Law", "NONE", "NONE"), ("Law", "NONE", "NONE"),
             ("Term", "The term is two years.", "The term is two years.")]
    rows = [{"id": f"e{i}", "category": c, "source": "acord", "prediction": p, "answer": a, "scores": score(p, a)}
            for i, (c, p, a) in enumerate(pairs)]
    return {"model": "tiny", "data": "acord:/d", "split": "test", **summarize(rows), "rows": rows}


def test_report_by_category_and_its_plot_keep_clause_and_none_examples_apart(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    saved = _saved_figures(monkeypatch)
    res = _mixed_result()
    law_sim = res["rows"][0]["scores"]["similarity"]
    md = report.write_report(res, tmp_path, baseline=res).read_text()
    by_category = md[md.index("## By category"):md.index("## By source")]
    clause, none = by_category.split("NONE examples:")
    assert f"| Law | 1 | {law_sim:.1f} |" in clause  # the clause example alone, not lifted by the NONE ones
    assert "| Law | 2 | 100.0 |" in none and "Term" not in none  # NONE examples: the share answered NONE
    assert "| category | examples | answered NONE % |" in none
    figure = saved[-1]  # categories.png: a panel per kind
    assert [ax.get_title() for ax in figure.axes] == ["Clause examples per category", "NONE examples per category"]
    widths = {t.get_text(): p.get_width() for t, p in zip(figure.axes[0].get_yticklabels(),
                                                          figure.axes[0].patches[2:])}  # [2:]: this run's bars
    assert widths["Law (n=1)"] == pytest.approx(law_sim)


def test_none_precision_and_recall_are_shown_in_the_all_rows_only(tmp_path, monkeypatch):
    """Within one kind they mean nothing (clause rows: 0 or undefined; NONE rows: always 100)."""
    res = _result()
    table = report.compare_table(res, res)
    assert "| all | NONE precision % |" in table and "| all | NONE recall % |" in table
    assert "| clause | NONE" not in table and "| none | NONE" not in table
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    md = report.write_report(res, tmp_path).read_text()
    overall = [ln for ln in md.splitlines() if ln.startswith(("| clause |", "| none |", "| all |"))]
    last_two = [[cell.strip() for cell in ln.split("|")[-3:-1]] for ln in overall]
    assert last_two == [["", ""], ["", ""], ["100.0", "50.0"]]  # the two kinds blank; all: tp 1, fp 0, fn 1


def test_like_for_like_reads_one_path_spelled_twice_as_one_and_compares_gold_answers(tmp_path):
    (tmp_path / "x").mkdir()
    res = _result()
    answers = {r["id"]: r["answer"] for r in res["rows"]}
    before = {**res, "data": f"jsonl:{tmp_path}/x/../d.jsonl"}
    assert report.same_examples_note(before, answers, f"jsonl:{tmp_path}/d.jsonl", "test") is None
    assert "ran on data" in report.same_examples_note(before, answers, f"jsonl:{tmp_path}/e.jsonl", "test")
    moved = {**answers, "e1": "a b d"}  # the data changed: the same id, another gold answer
    note = report.same_examples_note(before, moved, f"jsonl:{tmp_path}/d.jsonl", "test")
    assert note.startswith("1 of the 4 examples have another gold answer in the baseline (first: 'e1')")


def test_report_notes_a_baseline_read_with_another_max_new_tokens(tmp_path, capsys):
    after = {**_result(), "decode": "constrained", "max_new_tokens": 1024, "seq_len": 512}
    (tmp_path / "after.json").write_text(json.dumps(after))
    (tmp_path / "before.json").write_text(json.dumps({**after, "max_new_tokens": 64}))
    assert report.main([str(tmp_path / "after.json"), "--compare", str(tmp_path / "before.json"), "--out",
                        str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "note: the baseline's answers had --max-new-tokens 64, this run's 1024" in err
    assert "**Not like for like**: the baseline's answers had --max-new-tokens 64" in \
        (tmp_path / "r" / "report.md").read_text()
    # channel decoding without a focus stage generates nothing: the budget is no difference there
    channel = {**after, "decode": "channel", "channel_unit": "paragraph", "focus_adapter": None}
    (tmp_path / "after.json").write_text(json.dumps(channel))
    (tmp_path / "before.json").write_text(json.dumps({**channel, "max_new_tokens": 64}))
    assert report.main([str(tmp_path / "after.json"), "--compare", str(tmp_path / "before.json")]) == 0
    assert "max-new-tokens" not in capsys.readouterr().err


def test_report_says_when_the_adapter_trained_on_the_examples_scored(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    note = "--adapter runs/a/adapter trained on split 'train' of synthetic (runs/a/config.json), which shares " \
           "examples with the 'train' split scored here"
    md = report.write_report({**_result(), "not_held_out": [note]}, tmp_path / "a").read_text()
    assert f"- **not held out**: {note}" in md
    assert "not held out" not in report.write_report(_result(), tmp_path / "b").read_text()
