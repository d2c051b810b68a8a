"""Alignment (repair / reject; locate itself: tests/test_text.py), the trainer's refusal, and python -m data.check
on good and bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data import NONE, DataError, Example
from data.validate import RejectedError, check_rejected, load_validated, validate

REPO = Path(__file__).resolve().parents[1]
CONTRACT = ("1. Term. This Agreement begins on the Effective Date.\n2. Governing Law. This Agreement shall be "
            "governed by the laws of the State of New York, without regard to conflicts of law.\n3. Notices.")


def ex(answer, context=CONTRACT, i="e"):
    return Example(i, "jsonl", "Governing Law", "Governing Law", context, answer, "train")


def test_validate_repairs_to_the_contexts_own_text_and_rejects_the_rest():
    examples = [ex("This Agreement shall be governed by the laws of the State of New York", i="a"),
                ex("This Agreement shall be governed by the laws of the State of New  York", i="b"),
                ex("Licensee shall pay royalties of five percent.", i="c"), ex(NONE, i="d")]
    kept, rep = validate(examples, "t", {"origins": {"c": "file.jsonl:3"}})
    assert [e.id for e in kept] == ["a", "b", "d"]
    assert (rep.aligned, rep.repaired, rep.rejected, rep.none) == (2, 1, 1, 1)
    assert kept[1].answer == kept[0].answer and kept[1].answer in CONTRACT
    assert rep.rejected_list[0].startswith("file.jsonl:3: answer not found")
    assert rep.per_category["Governing Law"]["rejected"] == 1 and rep.per_split["train"]["repaired"] == 1


def test_trainer_refuses_more_than_one_percent_rejected_unless_allowed():
    examples = [ex(NONE, i=str(i)) for i in range(99)] + [ex("Not in the contract at all, not even close.", i="x")]
    _, rep = validate(examples, "spec")
    check_rejected(rep, 0.01)  # exactly 1%: allowed
    _, rep = validate(examples[50:], "spec")
    with pytest.raises(RejectedError, match=r"^spec: 2.0% of answers rejected \(limit 1.0%\), first: x: ") as e:
        check_rejected(rep, 0.01)
    assert "\n" not in str(e.value)
    check_rejected(rep, 0.05)


def _jsonl(path: Path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return f"jsonl:{path}"


GOOD = {"query": "Governing Law", "context": CONTRACT, "answer": "governed by the laws of the State of New York"}


@pytest.mark.parametrize("rows,match", [
    ([GOOD, "{not json"], r"d.jsonl:2: not valid JSON"),
    ([GOOD, {"query": "q", "answer": "a"}], r"d.jsonl:2: missing field 'context'"),
    ([GOOD, GOOD, {**GOOD, "answer": "  "}], r"d.jsonl:3: empty answer; write the clause copied from the context"),
    ([{**GOOD, "answer": "Licensee shall pay royalties of 5%."}], r"d.jsonl:1: answer not found in its context"),
    ([GOOD, [1, 2]], r"d.jsonl:2: expected a JSON object"),
    ([GOOD, {**GOOD, "split": "dev"}], r"d.jsonl:2: split 'dev' is not one of train, valid, test"),
])
def test_malformed_jsonl_gives_one_line_error_naming_file_and_line(tmp_path, rows, match):
    spec = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=match) as e:
        load_validated(spec)
    assert "\n" not in str(e.value)


def test_unreadable_file_names_the_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"query": "q", "context": "ok", "answer": "NONE"}\n' * 3000
                  + b'{"query": "q", "context": "\xff\xfe", "answer": "NONE"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3001: JSONL data is not UTF-8 \(byte 28 of the line\)"):
        load_validated(f"jsonl:{p}")  # the line, not an offset into some read buffer
    with pytest.raises(DataError, match=r"is a directory"):
        load_validated(f"jsonl:{tmp_path}")


def _check(*args, cwd):
    return subprocess.run([sys.executable, "-m", "data.check", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_check_cli_bad_input_exits_nonzero_with_one_line_and_writes_nothing(tmp_path):
    spec = _jsonl(tmp_path / "d.jsonl", [GOOD, "{oops"])
    before = sorted(os.listdir(tmp_path))
    r = _check(spec, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "d.jsonl:2: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == before
    r = _check("nonsense:spec", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown data spec") and r.stderr.count("\n") == 1


def test_check_cli_reports_rejected_and_fails_over_the_limit(tmp_path):
    spec = _jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "answer": "Royalties are five percent of net sales."}])
    r = _check(spec, cwd=tmp_path)
    assert r.returncode == 1 and "examples: 2  aligned 1 (NONE 0)  repaired 0  rejected 1" in r.stdout
    assert "d.jsonl:2: answer not found" in r.stdout and r.stderr.count("\n") == 1
    r = _check(spec, "--json", "--max-rejected", "0.6", cwd=tmp_path)
    rep = json.loads(r.stdout)
    assert r.returncode == 0 and rep["rejected"] == 1 and rep["tokens"]["how"].startswith("estimated")
    # DESIGN.md: the JSON keeps the clause-string counts under source.clauses, for every spec (a JSONL answer is
    # its own clause string)
    assert {k: rep["source"]["clauses"][k] for k in ("total", "aligned", "repaired", "rejected")} == \
        {"total": 2, "aligned": 1, "repaired": 0, "rejected": 1}


def test_check_cli_synthetic_report_with_tokenizer(llama3_tokenizer_json, tmp_path):
    r = _check("synthetic", "--split", "test", "--seq-len", "256", "--tokenizer", str(llama3_tokenizer_json),
               cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "examples: 58  aligned 58 (NONE 14)  repaired 0  rejected 0" in r.stdout
    assert "counted with" in r.stdout and "at --seq-len 256:" in r.stdout


def test_check_channel_rows_equal_the_rows_training_builds(llama3_tokenizer_json, llama3_tok):
    """data.check --channel: with every paragraph a candidate (--max-candidates above any context's count), each
    example's longest row is the row engine.channel_train builds from all its paragraphs and the empty clause
    (model.channel.channel_batch, independently): the reported maximum and query tokens equal those rows'. With
    fewer candidates the bound takes the longest paragraphs, so it can only shrink."""
    from data.validate import load_validated
    from model.channel import CHANNEL_NULL, IGNORE, channel_batch, units

    r = _check("synthetic", "--split", "test", "--tokenizer", str(llama3_tokenizer_json), "--channel", "paragraph",
               "--max-candidates", "64", "--json", cwd=REPO)
    assert r.returncode == 0, r.stderr
    ch = json.loads(r.stdout)["channel"]
    examples = load_validated("synthetic", "test")[0]
    built = [channel_batch(llama3_tok, [e.context[a:b] for a, b in units(e.context)] + [CHANNEL_NULL], e.query)
             for e in examples]
    assert ch["examples"] == len(examples) == 58
    assert ch["max"] == max(b["input_ids"].shape[1] for b in built)
    assert ch["max_supervised"] == max(int((b["labels"] != IGNORE).sum()) for b in built)
    few = json.loads(_check("synthetic", "--split", "test", "--tokenizer", str(llama3_tokenizer_json), "--channel",
                            "paragraph", "--max-candidates", "2", "--json", cwd=REPO).stdout)["channel"]
    assert few["max"] < ch["max"] and few["max_supervised"] < ch["max_supervised"]
    # with 2 candidates, every row training draws (the gold paragraph, one other, the empty clause) stays within
    # its example's bound, whichever others are drawn
    import random

    from engine.channel_train import choice_of, make_group
    from model.channel import longest_channel_row

    drawn = 0
    for e in examples:
        bound = longest_channel_row(llama3_tok, e.context, e.query, "paragraph", 2)
        if (c := choice_of(e)) is None:
            continue
        for seed in range(5):
            g = make_group(llama3_tok, e, *c, 2, 768, random.Random(seed))
            assert g["input_ids"].shape[1] <= bound[0] and int((g["labels"] != IGNORE).sum()) <= bound[1]
            drawn += 1
    assert drawn > 200 and max(longest_channel_row(llama3_tok, e.context, e.query, "paragraph", 2)[0]
                               for e in examples) == few["max"]
    r = _check("synthetic", "--channel", "paragraph", cwd=REPO)  # tokens cannot be estimated here
    assert r.returncode == 2 and "--tokenizer" in r.stderr and r.stderr.count("\n") == 1
