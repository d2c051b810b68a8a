"""Sources -> Examples: ACORD and CUAD from ../shared/datasets, synthetic contracts, JSONL, prompt templates."""
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from data import NONE, DataError, Example, load_examples, load_source, render_prompt
from data.example import TEMPLATES, template_index

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- prompts
def test_templates_are_imperative_without_chat_words():
    assert len(TEMPLATES) == 5
    for t in TEMPLATES:
        low = t.lower()
        assert "{query}" in t and "{context}" in t and "NONE" in t
        assert "assist" not in low and "accurately" not in low and "system" not in low and "you are" not in low


def test_template_choice_is_stable_across_processes():
    ids = [f"ex-{i}" for i in range(40)]
    code = f"from data.example import template_index; print([template_index(i) for i in {ids!r}])"
    outs = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {str([template_index(i) for i in ids]) + "\n"}
    assert len(set(template_index(i) for i in ids)) == 5  # all five in use


def test_render_prompt_holds_query_and_whole_context():
    ex = Example("x", "jsonl", "Governing Law", "Governing Law", "Some {braces} contract.", "NONE", "train")
    p = render_prompt(ex)
    assert "Governing Law" in p and "Some {braces} contract." in p


# ---------------------------------------------------------------- ACORD
@pytest.fixture(scope="module")
def acord(shared_datasets):
    return load_source(f"acord:{shared_datasets / 'acord'}")


def test_acord_split_counts_follow_official_query_splits(acord):
    examples, notes = acord
    queries = {s: {e.id.split(":")[2] for e in examples if e.split == s} for s in ("train", "valid", "test")}
    assert {s: len(q) for s, q in queries.items()} == {"train": 51, "valid": 6, "test": 57}
    counts = Counter((e.split, e.answer == NONE) for e in examples)
    # clauses rated >= 3 per split: train 361 (x3 wordings), valid 31, test 401
    assert counts[("train", False)] == 361 * 3 and counts[("valid", False)] == 31 and counts[("test", False)] == 401
    assert all(counts[(s, True)] > 0 for s in ("train", "valid", "test"))
    assert notes["counts"]["test"]["clause"] == 401 and notes["unmatched_query_formats"] == []


def test_acord_no_test_query_in_train(acord):
    examples, _ = acord
    qid = lambda e: e.id.split(":")[2]  # noqa: E731
    train = {qid(e) for e in examples if e.split == "train"}
    assert not train & {qid(e) for e in examples if e.split in ("test", "valid")}
    train_queries = {e.query for e in examples if e.split == "train"}
    assert not train_queries & {e.query for e in examples if e.split == "test"}


def test_acord_reads_csv_quoted_query_ids(acord):
    examples, _ = acord
    assert '"as is" clause with carveouts' in {e.query for e in examples if e.split == "train"}


def test_acord_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: not valid JSON") as e:
        load_examples(f"acord:{tmp_path}")
    assert "\n" not in str(e.value)
    (tmp_path / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n')
    with pytest.raises(DataError, match=r"queries.jsonl: ACORD queries not found"):
        load_examples(f"acord:{tmp_path}")


@pytest.mark.parametrize("query,needle", [
    ({"_id": ["q"], "metadata": {"split": "train"}}, "field '_id' must be a string"),
    ({"_id": "q", "metadata": "train"}, "field 'metadata' must be an object"),
    ({"_id": "q", "text": 5, "metadata": {"split": "train"}}, "field 'text' must be a string"),
])
def test_acord_query_fields_of_the_wrong_type_name_the_line(tmp_path, query, needle):
    (tmp_path / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q0", "metadata": {"split": "train"}}\n' + json.dumps(query))
    with pytest.raises(DataError, match=rf"queries.jsonl:2: {re.escape(needle)}") as e:
        load_examples(f"acord:{tmp_path}")
    assert "\n" not in str(e.value)


def test_acord_null_query_text_or_category_falls_back_to_the_id(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q0", "text": null, "metadata": {"split": "train", '
                                            '"category": null}}\n')
    with pytest.raises(DataError, match="qrels"):  # the queries read; the qrels are what is missing here
        load_examples(f"acord:{tmp_path}")


def test_acord_numeric_query_ids_match_their_qrels(shared_datasets, tmp_path):
    root = tmp_path / "acord"
    shutil.copytree(shared_datasets / "acord", root)
    qrels = root / "qrels" / "test.tsv"
    lines = qrels.read_text(encoding="utf-8").splitlines()
    qid = lines[1].split("\t")[0].strip('"')
    queries = [json.loads(x) for x in (root / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    for q in queries:
        if q["_id"] == qid:
            q["_id"] = 90001  # a JSON number; the qrels write it as text
    (root / "queries.jsonl").write_text("\n".join(map(json.dumps, queries)) + "\n", encoding="utf-8")
    rows = [x.split("\t") for x in lines[1:]]
    rows = [["90001", *r[1:]] if r[0].strip('"') == qid else r for r in rows]
    qrels.write_text("\n".join([lines[0]] + ["\t".join(r) for r in rows]) + "\n", encoding="utf-8")
    assert any(e.query == next(q.get("text") for q in queries if q["_id"] == 90001)
               for e in load_examples(f"acord:{root}", "test"))


def test_acord_answers_verbatim_among_k_distractors(acord):
    examples, _ = acord
    for e in examples:
        assert e.answer == NONE or e.answer in e.context
        assert e.context.count("\n\n") >= 4  # k = 4 distractors + the clause (clauses may hold blank lines too)
    assert len({e.id for e in examples}) == len(examples)


def test_acord_is_deterministic(shared_datasets, acord):
    again = load_examples(f"acord:{shared_datasets / 'acord'}", "test")
    assert again == [e for e in acord[0] if e.split == "test"]


# ---------------------------------------------------------------- CUAD
@pytest.fixture(scope="module")
def cuad(shared_datasets):
    return load_source(f"cuad:{shared_datasets / 'cuad'}")


def test_cuad_filenames_resolve_and_unresolved_are_reported(cuad):
    _, notes = cuad
    assert notes["resolved_files"] == 466  # every .txt in this copy; its README says 466 of 510 contracts
    assert sorted(n[:10] for n in notes["unresolved_files"]) == ["PLAYAHOTEL", "SightLife "]


def test_cuad_clause_strings_aligned_or_repaired_at_least_99_percent(cuad):
    _, notes = cuad
    cl = notes["clauses"]
    assert cl["aligned"] + cl["repaired"] + cl["rejected"] == cl["total"] > 9000
    assert (cl["aligned"] + cl["repaired"]) / cl["total"] >= 0.99
    assert len(cl["rejected_list"]) == min(5, cl["rejected"])


def test_cuad_omitted_markers_are_split_never_in_answers(cuad):
    examples, notes = cuad
    assert notes["clauses"]["omitted_split"] > 600
    assert not any("<omitted>" in e.answer for e in examples)
    for e in examples:
        assert e.answer == NONE or e.answer in e.context


def test_cuad_splits_are_disjoint_by_contract_and_windows_bounded(cuad):
    examples, notes = cuad
    stems = {s: {e.id.split(":")[1] for e in examples if e.split == s} for s in ("train", "valid", "test")}
    assert not (stems["train"] & stems["test"]) and not (stems["train"] & stems["valid"])
    assert {s: notes["counts"][s]["contracts"] for s in stems} == {"train": 378, "valid": 45, "test": 43}
    assert max(len(e.context) for e in examples) <= 4000
    assert 0.2 < sum(e.answer == NONE for e in examples) / len(examples) < 0.5
    assert "Parties" not in {e.category for e in examples} and len({e.category for e in examples}) == 40


def _mini_cuad(root: Path, rows: list[tuple], texts: dict[str, str]):
    """A two-category CUAD copy: rows = (master filename, Governing Law cell[, its -Answer cell])."""
    (root / "full_contract_txt").mkdir(parents=True)
    for name, text in texts.items():
        (root / "full_contract_txt" / name).write_text(text, encoding="utf-8")
    (root / "category_descriptions.csv").write_text(
        "Category (incl. context and answer),Description,Answer Format,Group\n"
        "Category: Governing Law,Description: Which law governs?,Answer Format: State,Group: -\n"
        "Category: Parties,Description: Who signed,Answer Format: Names,Group: -\n", encoding="utf-8")
    import csv

    with open(root / "master_clauses.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Filename", "Parties", "Parties-Answer", "Governing Law", "Governing Law-Answer"])
        for name, cell, *answer in rows:
            w.writerow([name, "[]", "", cell, answer[0] if answer else ""])


def test_cuad_resolves_messy_names_and_lists_rejected_clauses(tmp_path):
    law = "This Agreement is governed by the laws of Delaware."
    body = "Intro words here. " * 30 + law + " More words follow. " * 30
    texts = {unicodedata.normalize("NFD", "LECLANCHÉ S.A. - JDA.txt"): body,
             "MACY_S,INC-EX-99.txt": body, "ASHWORTH, INC.txt": body, "Monsanto A_R AGREEMENT .txt": body}
    rows = [("LECLANCHÉ S.A. - JDA.PDF", repr([law])),
            ("MACY'S,INC-EX-99.pdf", repr(["governed by the laws <omitted> of Delaware."])),
            ("ASHWORTH, INC..PDF'", repr(["This  Agreement is governed by the laws of Delaware."])),  # whitespace
            ("Monsanto A&R AGREEMENT .PDF", repr(["A clause that appears nowhere in the contract text."])),
            ("Missing Contract.pdf", "[]")]
    _mini_cuad(tmp_path, rows, texts)
    examples, notes = load_source(f"cuad:{tmp_path}", max_context_chars=400)
    assert notes["resolved_files"] == 4 and notes["unresolved_files"] == ["Missing Contract.pdf"]
    cl = notes["clauses"]
    assert (cl["aligned"], cl["repaired"], cl["rejected"], cl["omitted_split"]) == (1, 2, 1, 1)
    assert "master_clauses.csv:5" in cl["rejected_list"][0] and "appears nowhere" in cl["rejected_list"][0]
    for e in examples:
        assert e.answer == NONE or (e.answer in e.context and "<omitted>" not in e.answer)
        assert len(e.context) <= 400


def test_cuad_pieces_are_placed_in_order_and_short_ones_only_beside_their_neighbours(tmp_path):
    """An <omitted> string's pieces follow each other in the contract: a '.' or a date found first somewhere
    else must not pull unrelated text into the answer (ALLISONTRANSMISSION's Effective Date became '.1 ...
    COOPERATION AGREEMENT ... December 12, 2014' when each piece took its first occurrence)."""
    law = "The laws of Delaware govern this Agreement, without regard to conflicts of law."
    filler = " ".join(f"Section {i} says nothing much here." for i in range(60))
    body = (f"Exhibit 99.1\n\nDated as of May 1, 2020.\n\n{filler}\n\nDated as of May 1, 2020, the parties agree."
            f"\n\n{filler}\n\n{law}\n\n{filler}\n\nSee also clause 9.")
    cell = repr(["Dated as of May 1, 2020<omitted>the parties agree<omitted>.",  # the '.' right after: kept
                 "The laws of Delaware govern<omitted>conflicts of law<omitted>9."])  # '9.' far away: dropped
    _mini_cuad(tmp_path, [("A.pdf", cell)], {"A.txt": body})
    examples, notes = load_source(f"cuad:{tmp_path}", max_context_chars=600)
    answers = sorted(e.answer for e in examples if e.answer != NONE)
    assert answers == ["Dated as of May 1, 2020, the parties agree.",
                       "The laws of Delaware govern this Agreement, without regard to conflicts of law"]
    assert notes["clauses"]["short_dropped"] == 1 and notes["clauses"]["repaired"] == 2
    # a string of short pieces only, each far from the next: rejected, not a clause nowhere (and not counted as
    # repaired), so the category gets no NONE window in this contract
    cell = repr(["Dated as of May 1, 2020<omitted>the parties agree<omitted>.", "Section 3<omitted>Section 50"])
    _mini_cuad(tmp_path / "b", [("A.pdf", cell)], {"A.txt": body})
    examples, notes = load_source(f"cuad:{tmp_path / 'b'}", max_context_chars=600)
    assert (notes["clauses"]["rejected"], notes["clauses"]["short_dropped"]) == (1, 2)
    assert not any(e.answer == NONE for e in examples)


def test_cuad_answers_are_whole_words_and_none_windows_hold_no_clause_string(tmp_path):
    law = "This Agreement shall be governed by the laws of the State of New York."
    filler = " ".join(f"Paragraph {i} is about delivery schedules." for i in range(40))
    # the annotation stops inside 'York'; the same sentence repeats in a schedule far away
    body = law + "\n\n" + filler + "\n\n" + filler + "\n\nSchedule: " + law + "\n\n" + filler
    _mini_cuad(tmp_path, [("A.pdf", repr([law[:-3]]))], {"A.txt": body})
    examples, notes = load_source(f"cuad:{tmp_path}", max_context_chars=500, none_ratio=50)
    assert [e.answer for e in examples if e.answer != NONE] == [law[:-1]] and notes["clauses"]["widened"] == 1
    nones = [e for e in examples if e.answer == NONE]
    assert nones and not any("laws of the State of New" in e.context for e in nones)


def test_cuad_answer_column_naming_a_clause_blocks_none_windows(tmp_path):
    """14 CUAD rows have no clause string but an answer column saying the clause exists ('California')."""
    body = " ".join(f"Paragraph {i} is about delivery schedules." for i in range(100))
    law = "This Agreement is governed by the laws of Delaware."
    rows = [("A.pdf", "[]", "California"), ("B.pdf", "[]", ""), ("C.pdf", repr([law]), "Delaware")]
    _mini_cuad(tmp_path, rows, {"A.txt": body, "B.txt": body, "C.txt": law + "\n\n" + body})
    examples, _ = load_source(f"cuad:{tmp_path}", max_context_chars=400, none_ratio=50)
    nones = {e.id.split(":")[1] for e in examples if e.answer == NONE}
    assert "B" in nones and "A" not in nones


def test_cuad_alike_contracts_share_a_split(tmp_path):
    """The same filing under two names (CUAD has 'X AGREEMENT.txt' and 'X AGREEMENT(1).txt') must not land in
    train and test; contracts that merely share boilerplate keep their own split."""
    from data.cuad import contract_split, split_by_contract

    names = [f"Contract {i}" for i in range(40)]
    a = next(n for n in names if contract_split(n) == "train")
    b = next(n for n in names if contract_split(n) != "train")
    c = next(n for n in names if contract_split(n) != "train" and n != b)
    words = [f"w{i % 997}x{i % 13}" for i in range(3000)]
    text = " ".join(words)
    other = " ".join(words[:300] + [f"z{i}" for i in range(2700)])  # 10% in common
    (tmp_path / "t").mkdir()
    files = {}
    for name, t in ((a, text), (b, text.replace("w5x5", "w5x6")), (c, other)):
        files[name.lower().replace(" ", "")] = tmp_path / "t" / f"{name}.txt"
        files[name.lower().replace(" ", "")].write_text(t, encoding="utf-8")
    got = split_by_contract(files)
    key = {n: n.lower().replace(" ", "") for n in (a, b, c)}
    assert got[key[a]] == got[key[b]] and got[key[c]] == contract_split(c)


def test_cuad_real_duplicates_share_a_split(cuad, shared_datasets):
    examples, _ = cuad
    split = {e.id.split(":")[1]: e.split for e in examples}
    aduro = sorted(k for k in split if k.startswith("ADUROBIOTECH"))
    assert len(aduro) == 2 and split[aduro[0]] == split[aduro[1]]
    # and the fit / calib cut of train keeps them together too (calibration on a contract fit trained on)
    fit, calib = (load_examples(f"cuad:{shared_datasets / 'cuad'}", part) for part in ("fit", "calib"))
    in_fit, in_calib = ({e.id.split(":")[1] for e in part} for part in (fit, calib))
    assert not in_fit & in_calib and len({aduro[0] in in_fit, aduro[1] in in_fit}) == 1
    allison = [e.answer for e in examples if e.id.startswith("cuad:ALLISONTRANSMISSION")
               and e.category == "Effective Date"]
    assert allison and not any("COOPERATION" in a for a in allison)


def test_cuad_csv_not_utf8_or_malformed_names_the_file_and_line(tmp_path):
    _mini_cuad(tmp_path, [("A.pdf", "[]")], {"A.txt": "text"})
    master = tmp_path / "master_clauses.csv"
    master.write_bytes(master.read_bytes() + b"B.pdf,[],,caf\xe9,\n")
    with pytest.raises(DataError, match=r"master_clauses.csv:3: CUAD master_clauses.csv is not UTF-8"):
        load_source(f"cuad:{tmp_path}")
    master.write_bytes(master.read_bytes().replace(b"caf\xe9", b'"unterminated\x00'))
    with pytest.raises(DataError, match=r"master_clauses.csv:\d+: malformed CSV") as e:
        load_source(f"cuad:{tmp_path}")
    assert "\n" not in str(e.value)


def test_cuad_bad_clause_cell_names_file_and_line(tmp_path):
    _mini_cuad(tmp_path, [("A.pdf", "['unterminated")], {"A.txt": "text"})
    with pytest.raises(DataError, match=r"master_clauses.csv:2: column 'Governing Law'"):
        load_source(f"cuad:{tmp_path}")


# ---------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_small_and_has_none():
    ex = load_examples("synthetic")
    assert ex == load_examples("synthetic")
    n = Counter(e.split for e in ex)
    assert 300 <= n["train"] <= 500 and 40 <= n["test"] <= 60 and n["valid"] > 0
    assert len({e.category for e in ex}) >= 10
    for s in ("train", "test"):
        assert 0.1 < sum(e.answer == NONE for e in ex if e.split == s) / n[s] < 0.4
    assert all(e.answer == NONE or e.answer in e.context for e in ex)
    assert all(600 < len(e.context) < 2000 for e in ex)  # about 150-400 tokens


def test_synthetic_train_and_test_wordings_are_disjoint():
    from data.synthetic import CLAUSES, TEST_WORDINGS, TRAIN_WORDINGS

    assert len(CLAUSES) >= 10 and all(len(w) >= 5 for w in CLAUSES.values())
    ex = load_examples("synthetic")

    def wording(e):  # which wording produced the answer: each one as a regex with its {slots} as wildcards
        hits = [i for i, t in enumerate(CLAUSES[e.category])
                if re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+?", re.escape(t)), e.answer)]
        assert len(hits) == 1, (e.answer, hits)
        return hits[0]
    used = {s: {wording(e) for e in ex if e.split == s and e.answer != NONE} for s in ("train", "test")}
    assert used["train"] <= set(range(5)[TRAIN_WORDINGS]) and used["test"] <= set(range(5)[TEST_WORDINGS])
    train_answers = {e.answer for e in ex if e.split == "train"}
    assert not train_answers & {e.answer for e in ex if e.split == "test" and e.answer != NONE}


# ---------------------------------------------------------------- JSONL and specs
def test_jsonl_round_trip_with_defaults(tmp_path):
    p = tmp_path / "d.jsonl"
    law = "Laws of Ohio apply."
    p.write_text(json.dumps({"query": "Governing Law", "context": law, "answer": law})
                 + "\n\n" + json.dumps({"id": "b", "query": "Q", "context": "c", "answer": "NONE", "split": "test"})
                 + "\n")
    ex, notes = load_source(f"jsonl:{p}")
    assert [e.id for e in ex] == ["d:1", "b"] and ex[0].category == "Governing Law" and ex[1].split == "test"
    assert notes["origins"]["b"] == f"{p}:3"
    assert [e.id for e in load_examples(f"jsonl:{p}", "test")] == ["b"]


def test_jsonl_none_in_any_spelling_is_none_and_an_empty_query_or_a_lone_surrogate_is_refused(tmp_path):
    p = tmp_path / "d.jsonl"
    ctx = "The parties shall nonetheless meet. None of the terms apply."
    rows = [{"query": "Q", "context": ctx, "answer": a}
            for a in ("none", "None.", '"NONE"', "none\r\n", "None of the terms")]
    p.write_text("\n".join(map(json.dumps, rows)) + "\n")
    assert [e.answer for e in load_examples(f"jsonl:{p}")] == [NONE, NONE, NONE, NONE, "None of the terms"]
    for bad, needle in (({"query": " ", "context": ctx, "answer": "NONE"}, "d.jsonl:2: empty query"),
                        ({"query": "Q", "context": "x \ud800 y", "answer": "NONE"}, "d.jsonl:2: holds an unpaired")):
        p.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=needle) as e:
            load_examples(f"jsonl:{p}")
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec,match", [
    ("parquet:x", r"unknown data spec 'parquet:x'"), ("acord", r"unknown data spec"),
    ("acord:/nonexistent/dir", r"/nonexistent/dir: ACORD directory not found"),
    ("jsonl:/nonexistent/f.jsonl", r"/nonexistent/f.jsonl: JSONL data not found"),
])
def test_bad_specs_raise_one_line_errors(spec, match):
    with pytest.raises(DataError, match=match) as e:
        load_examples(spec)
    assert "\n" not in str(e.value)


def test_unknown_loader_option_is_an_error():
    with pytest.raises(DataError, match=r"unknown option\(s\) \['k'\] for synthetic"):
        load_examples("synthetic", k=3)


def test_cuad_left_out_category_is_validated_and_said_so(cuad, shared_datasets):
    examples, notes = cuad
    parties = notes["left_out"]["Parties"]
    assert parties["clause_strings"] > 1000 and "NONE" in parties["why"]  # counted in clauses.total above
    assert not any(e.category == "Parties" for e in examples)  # but no examples are built from them
    r = subprocess.run([sys.executable, "-m", "data.check", f"cuad:{shared_datasets / 'cuad'}", "--split", "test"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "left out of training: 'Parties'" in r.stdout
    assert re.search(r"short pieces dropped \(far from the rest of their string\): \d+  spans widened to whole "
                     r"words: [1-9]", r.stdout)


def test_cuad_category_list_is_the_datasets_own(shared_datasets):
    from data.cuad import CATEGORIES, read_categories

    assert list(CATEGORIES) == list(read_categories(shared_datasets / "cuad" / "category_descriptions.csv"))


# ---------------------------------------------------------------- the train split's held-out part
def test_acord_fit_and_calib_cut_train_by_whole_queries(shared_datasets, acord):
    spec = f"acord:{shared_datasets / 'acord'}"
    train = [e for e in acord[0] if e.split == "train"]
    fit, fit_notes = load_source(spec, "fit")
    calib, calib_notes = load_source(spec, "calib")
    qid = lambda e: e.id.split(":")[2]  # noqa: E731
    # a partition of train, each part in train's order, no query on both sides
    assert sorted(e.id for e in fit + calib) == sorted(e.id for e in train)
    assert [e.id for e in fit] == [e.id for e in train if e.id in {x.id for x in fit}]
    assert not {qid(e) for e in fit} & {qid(e) for e in calib}
    # 1/8 of the 51 train queries, every wording of each, both kinds of answer
    assert len({qid(e) for e in calib}) == round(51 / 8)
    assert {e.id.rsplit(":", 1)[1] for e in calib} == {"short", "medium", "long"}
    assert any(e.answer == NONE for e in calib) and any(e.answer != NONE for e in calib)
    assert calib_notes["holdout"] == {"part": "calib", "examples": len(calib), "of_train": len(train)}
    assert fit_notes["holdout"]["examples"] == len(fit)
    # the cut is stable: another load gives the same ids
    assert [e.id for e in load_source(spec, "calib")[0]] == [e.id for e in calib]


def test_holdout_units_are_the_splits_own_units():
    from data.example import holdout, holdout_unit

    ex = lambda i, src, unit: Example(id=i, source=src, category="c", query="q", context="x", answer=NONE,  # noqa: E731
                                      split="train")
    assert holdout_unit(ex("acord:train:Some Query:c1:long", "acord", None)) == "Some Query"
    assert holdout_unit(ex("cuad:Contract_A:Governing Law:12", "cuad", None)) == "Contract_A"
    assert holdout_unit(ex("synthetic:train:7:Term", "synthetic", None)) == "7"
    assert holdout_unit(ex("row-3", "jsonl", None)) == "row-3"
    # every example of a CUAD contract lands on the same side
    rows = [ex(f"cuad:C{c}:Cat{k}:{k}", "cuad", None) for c in range(40) for k in range(3)]
    calib = holdout(rows, "calib")
    assert len({e.id.split(":")[1] for e in calib}) == 5 and len(calib) == 15
    assert len(holdout(rows, "fit")) == 105


def test_synthetic_calib_split_loads_and_unknown_split_names_both_kinds():
    calib, _ = load_source("synthetic", "calib")
    assert calib and all(e.split == "train" for e in calib)
    with pytest.raises(DataError, match="fit, calib"):
        load_source("synthetic", "dev")
