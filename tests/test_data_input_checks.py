"""Input that used to pass silently: unknown JSONL keys, an empty JSONL file, ACORD scores outside 0-4, CUAD NONE
windows naming their clause in another case, answers cut inside words, fuzzy repairs that lose a final period,
and focus rows that are only a list marker."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data import NONE, DataError, Example, load_source
from data.validate import load_validated, validate
from tests.test_data_sources import _mini_cuad

REPO = Path(__file__).resolve().parents[1]
ROW = {"query": "Governing Law", "context": "This Agreement is governed by the laws of Texas.",
       "answer": "governed by the laws of Texas"}


def _jsonl(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return f"jsonl:{path}"


def _ex(answer: str, context: str, i: str = "e") -> Example:
    return Example(i, "jsonl", "Indemnification", "Indemnification", context, answer, "train")


# ---------------------------------------------------------------- JSONL
@pytest.mark.parametrize("key,hint", [("spilt", "split"), ("Answer", "answer")])
def test_jsonl_unknown_field_is_refused_naming_line_key_and_the_allowed_ones(tmp_path, key, hint):
    """{"spilt": "test"} would put a test row in training; {"Answer": ...} is named as the slip it is."""
    row = {**ROW, key: ROW["answer"] if key == "Answer" else "test"}
    if key == "Answer":
        del row["answer"]
    spec = _jsonl(tmp_path / "d.jsonl", [ROW, row])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: unknown field '{key}' \(did you mean '{hint}'\?\); "
                                        r"allowed: query, context, answer, id, category, split, source$") as e:
        load_source(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["", "\n\n   \n\t\n"])
def test_jsonl_without_an_example_is_refused_by_the_loader_and_data_check(tmp_path, text):
    path = tmp_path / "d.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl: no examples \(empty or blank lines only\)"):
        load_source(f"jsonl:{path}")
    r = subprocess.run([sys.executable, "-m", "data.check", f"jsonl:{path}"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2 and r.stdout == "" and "no examples" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_jsonl_rows_of_other_splits_are_not_an_empty_file(tmp_path):
    """Only a file with nothing in it is refused; one whose rows are all in other splits loads as no examples."""
    spec = _jsonl(tmp_path / "d.jsonl", [{**ROW, "split": "test"}])
    assert load_source(spec, "train")[0] == []


# ---------------------------------------------------------------- ACORD
def _mini_acord(root: Path, scores: list[str]) -> None:
    """One train query, six clauses; clause i gets scores[i]."""
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"c{i}", "text": f"Clause number {i}."}) + "\n"
                                               for i in range(len(scores))))
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "Cap on liability",
                                                    "metadata": {"split": "train", "category": "Cap"}}) + "\n")
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                              + "".join(f"q\tc{i}\t{s}\n" for i, s in enumerate(scores)))


@pytest.mark.parametrize("bad", ["7", "-2", "3.5"])
def test_acord_qrels_score_outside_0_to_4_names_the_line(tmp_path, bad):
    """The lawyers' ratings are 0-4: a 7 would be taken as a positive and a -2 dropped, without a word."""
    _mini_acord(tmp_path, ["0", "0", "0", "0", "0", "4", bad])
    with pytest.raises(DataError, match=rf"qrels/train\.tsv:8: score '{bad}' is not an integer 0-4") as e:
        load_source(f"acord:{tmp_path}", "train")
    assert "\n" not in str(e.value)
    _mini_acord(tmp_path / "ok", ["0", "0", "0", "0", "0", "4", "2"])  # in range: loads
    assert any(e.answer == "Clause number 5." for e in load_source(f"acord:{tmp_path / 'ok'}", "train")[0])


# ---------------------------------------------------------------- CUAD
def test_cuad_none_windows_hold_no_clause_string_in_another_case_or_spacing(tmp_path):
    """LOOKSMART's title 'SPONSORSHIP AGREEMENT' comes back in a page footer as 'Sponsorship Agreement - July 16,
    2012': a window holding that footer does name the document, so it is no NONE example for its category."""
    law = "GOVERNED BY THE LAWS OF THE STATE OF DELAWARE"
    filler = " ".join(f"Paragraph {i} is about delivery schedules." for i in range(30))
    footer = "Page 2 -- governed by the laws\n  of the   State of Delaware -- July 16, 2012"
    body = law + "\n\n" + "\n\n".join([filler, footer, filler, filler, footer, filler])
    _mini_cuad(tmp_path, [("A.pdf", repr([law]))], {"A.txt": body})
    examples, _ = load_source(f"cuad:{tmp_path}", max_context_chars=500, none_ratio=50)
    nones = [e for e in examples if e.answer == NONE]
    assert nones  # the filler-only windows
    fold = " ".join(law.lower().split())
    assert not any(fold in " ".join(e.context.lower().split()) for e in nones)


# ---------------------------------------------------------------- answers inside words, fuzzy repairs
def test_answers_found_only_inside_words_are_kept_counted_and_named(tmp_path, capsys):
    """'at' in 'the cat sat on the mat' is the context's own text, so it is kept, but a clause is copied in
    whole words: counted, the first named by file and line, and the trainer's loader warns on stderr. 'the' in
    'bathe the dog' is a whole word at its second occurrence: not counted."""
    spec = _jsonl(tmp_path / "d.jsonl", [{"query": "q", "context": "bathe the dog", "answer": "the"},
                                         {"query": "q", "context": "the cat sat on the mat", "answer": "at"},
                                         {"query": "q", "context": "the cat sat on the mat", "answer": "the ca"},
                                         {"query": "q", "context": "the cat sat on the mat", "answer": "he c"}])
    kept, rep = load_validated(spec)
    assert len(kept) == 4 and rep.rejected == 0 and rep.midword == 3
    assert [x.split(": ")[:2] for x in rep.midword_list] == [
        [f"{tmp_path / 'd.jsonl'}:{n}", f"answer {how} inside a word"]
        for n, how in ((2, "begins"), (3, "ends"), (4, "begins and ends"))]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 answer(s) begin or end inside a word" in err and "d.jsonl:2" in err
    assert rep.to_dict()["midword"] == 3


def test_answers_inside_words_are_listed_by_data_check_and_warned_of_once_under_torchrun(tmp_path, capsys,
                                                                                        monkeypatch):
    """data.check's plain report names them (the warning sends the user there); under torchrun every rank loads
    the data, and only rank 0 warns."""
    from data import check
    spec = _jsonl(tmp_path / "d.jsonl", [{"query": "q", "context": "the cat sat on the mat", "answer": "at"}])
    assert check.main([spec]) == 0
    out = capsys.readouterr().out
    assert "inside a word (kept): 1" in out and f"{tmp_path / 'd.jsonl'}:1: answer begins inside a word" in out
    monkeypatch.setenv("RANK", "1")
    load_validated(spec)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    load_validated(spec)
    assert "inside a word" in capsys.readouterr().err


CONTRACT = ("1. Definitions. Terms used herein have the meanings given.\n12. Indemnification. The Licensee shall "
            "indemnify and hold harmless the Licensor from any and all claims, losses and damages arising out of the "
            "Licensee's use of the Software.\n13. Notices. All notices shall be in writing.")
CLAUSE = ("The Licensee shall indemnify and hold harmless the Licensor from any and all claims, losses and damages "
          "arising out of the Licensee's use of the Software.")


@pytest.mark.parametrize("answer", [
    CLAUSE.replace("shall", "shal"),  # one letter short: the span came out one character short, the period lost
    CLAUSE[5:].replace("Licensee's use", "Licensees use"),  # the span began inside 'Licensee'
    f'"{CLAUSE}"',  # quote marks the contract lacks: the span ran on into the next line's '13.'
])
def test_fuzzy_repairs_end_at_word_boundaries_and_keep_the_final_period(answer):
    kept, rep = validate([_ex(answer, CONTRACT)])
    want = CLAUSE[4:] if answer.startswith("icensee") else CLAUSE  # widened to the word it began inside
    assert rep.repaired == 1 and kept[0].answer == want
    assert rep.midword == 0


# ---------------------------------------------------------------- focus rows
def test_focus_unit_of_a_list_marker_is_joined_with_the_next_so_the_clause_is_kept():
    """'B.' is a sentence of its own to model.channel.sentences; alone it made a row whose context and answer are
    'B.', the clause lost. Joined with the sentences after it, the answer stays verbatim from its start."""
    from data.focus import MIN_UNIT_WORDS, focus_example, focus_examples

    ctx = ("A. Hire any employee of the Company. B. Employ or seek to employ any person employed by the Company. "
           "C. Other things.\n\n, 2006\n\nLadies and Gentlemen: we write to you.")
    clause = "B. Employ or seek to employ any person employed by the Company."
    ex, kind, joined = focus_example(_ex(clause, ctx))
    assert (ex.context, ex.answer, kind, joined) == (clause, clause, "whole", True)
    ex, kind, joined = focus_example(_ex(", 2006", ctx))  # a date fragment: its paragraph has no words to trim
    assert (ex.context, ex.answer, kind, joined) == (", 2006\n\nLadies and Gentlemen: we write to you.", ", 2006",
                                                     "inside", True)
    ex, kind, joined = focus_example(_ex("Hire any employee", ctx))  # a unit of enough words: as it was
    assert (ex.context, kind, joined) == ("Hire any employee of the Company.", "inside", False)
    rows, counts = focus_examples([_ex(clause, ctx, "a"), _ex(", 2006", ctx, "b"), _ex(NONE, ctx, "c")])
    assert counts.joined == 2 and counts.none == 1 and len(rows) == 2
    assert all(r.answer in r.context and len(r.context.split()) >= MIN_UNIT_WORDS for r in rows)
