"""engine.extract: windows over a long contract, verbatim quotes with exact offsets, snapping, errors.

The model's answers are scripted (a fake generate that "finds" the clause when its window holds it), so the
tests pin the windowing, locating and printing logic; the real model path runs once on a tiny random Llama.
"""
import json
import re

import pytest

from data.text import make_windows
from engine.extract import find_clause, main
from tests.test_evaluate import make_tiny_model_dir

CLAUSE = ("This Agreement shall be governed by and construed in accordance with the laws of the State of\r\n"
          "Delaware, without regard to its conflict of laws principles.")


def _contract() -> str:
    filler = [f"{i}. Section {i}. The parties agree to item number {i} as described in Exhibit {i}.\r\n"
              for i in range(1, 60)]
    return "MASTER SERVICES AGREEMENT\r\n" + "".join(filler[:40]) + "41. Governing Law. " + CLAUSE + "\r\n" \
        + "".join(filler[40:])


def _byte_count(s: str) -> int:
    return len(s.encode("utf-8"))  # the byte-level test tokenizer: one token per byte


def _finder(reply):
    """A fake model: for each prompt, reply(prompt_text) if the clause (up to whitespace) is in it, else NONE."""
    norm_clause = " ".join(CLAUSE.split())

    def answer(prompts, contexts=None):
        return [reply(norm_clause) if norm_clause in " ".join(p.split()) else "NONE" for p in prompts]
    return answer


def test_windows_cover_the_text_with_overlap_and_fit():
    text = _contract()
    wins = make_windows(text, _byte_count, 400, overlap=0.25)
    assert len(wins) > 5 and wins[0][0] == 0 and wins[-1][1] == len(text)
    for (a, b), (c, d) in zip(wins, wins[1:]):
        assert a < c < b <= d  # consecutive windows overlap and advance
    assert all(_byte_count(text[a:b]) <= 400 for a, b in wins)
    assert make_windows("short text", _byte_count, 400) == [(0, 10)]


def test_verbatim_answer_gives_exact_offsets():
    text = _contract()
    matches, n_windows = find_clause(text, "Governing Law", _finder(lambda c: CLAUSE), _byte_count, 400)
    assert n_windows > 5 and matches
    m = matches[0]
    assert (m.start, m.end) == (text.index(CLAUSE), text.index(CLAUSE) + len(CLAUSE))
    assert text[m.start:m.end] == CLAUSE and m.verbatim and m.score == 100.0


def test_whitespace_changed_answer_snaps_to_the_files_text():
    text = _contract()
    matches, _ = find_clause(text, "Governing Law", _finder(lambda c: c), _byte_count, 400)  # "\r\n" -> " "
    m = matches[0]
    assert text[m.start:m.end] == CLAUSE and m.score == 100.0 and not m.verbatim


def test_non_verbatim_answer_snaps_to_best_span_with_its_score():
    text = _contract()
    garbled = lambda c: c.replace("construed in accordance with", "construed under").replace("Delaware", "Delawere")
    matches, _ = find_clause(text, "Governing Law", _finder(garbled), _byte_count, 400)
    m = matches[0]
    assert text[m.start:m.end] == CLAUSE  # the quote is the contract's text, not the model's
    assert 80 < m.score < 100 and not m.verbatim


def test_nothing_found_when_every_window_says_none():
    matches, n = find_clause(_contract(), "Non-Compete", lambda ps, ctxs: ["NONE"] * len(ps), _byte_count, 400)
    assert matches == [] and n > 1


def test_hallucinated_answer_below_min_score_is_not_quoted():
    made_up = lambda ps, ctxs: ["Supplier shall not compete with Buyer in Ohio for five years."] * len(ps)
    assert find_clause(_contract(), "Non-Compete", made_up, _byte_count, 400, min_score=60)[0] == []


# ---- the command on a tiny model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-extract") / "model")


@pytest.fixture
def contract_file(tmp_path):
    p = tmp_path / "contract.txt"
    p.write_bytes(_contract().encode("utf-8"))
    return p


def _fake_generate(reply, ended=True):
    finder = _finder(reply)

    def generate(model, tok, prompts, max_new_tokens=256, temperature=0.0, batch_size=8, stopped=None, **kw):
        if stopped is not None:
            stopped.extend([ended] * len(prompts))
        return finder(prompts)
    return generate


def test_cli_prints_clause_with_offsets_in_the_file(tiny_model_dir, contract_file, monkeypatch, capsys):
    import engine.extract

    monkeypatch.setattr(engine.extract, "generate", _fake_generate(lambda c: c))
    args = ["--model", str(tiny_model_dir), "--contract", str(contract_file), "--clause", "Governing Law",
            "--seq-len", "900", "--max-new-tokens", "200", "--decode", "free", "--quiet"]
    assert main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    raw = contract_file.read_bytes().decode("utf-8")
    assert res["found"] and res["windows"] > 1
    assert raw[res["start"]:res["end"]] == res["text"] == CLAUSE and res["score"] == 100.0

    assert main(args) == 0
    out = capsys.readouterr().out
    m = re.match(r"Governing Law clause, characters (\d+)-(\d+) of .*\(copy score 100\.0", out)
    assert m and raw[int(m[1]):int(m[2])] == CLAUSE and CLAUSE in out


class _Stdout:
    """A standard output whose writes fail: a reader that has gone (`| head -c 0`) or a full disk (`> /dev/full`)."""

    def __init__(self, error):
        self.error = error

    def write(self, _s):
        raise self.error

    def flush(self):
        pass


@pytest.mark.parametrize("json_flag", [["--json"], []])
def test_stdout_that_fails_is_quiet_for_a_closed_pipe_and_named_otherwise(tiny_model_dir, contract_file,
                                                                          monkeypatch, capsys, json_flag):
    import errno
    import sys

    import engine.extract

    monkeypatch.setattr(engine.extract, "generate", _fake_generate(lambda c: c))
    args = ["--model", str(tiny_model_dir), "--contract", str(contract_file), "--clause", "Governing Law",
            "--seq-len", "900", "--max-new-tokens", "200", "--decode", "free", "--quiet", *json_flag]
    monkeypatch.setattr(sys, "stdout", _Stdout(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    with pytest.raises(SystemExit) as e:  # as a Unix tool killed by SIGPIPE: 128 + 13, nothing on stderr
        main(args)
    assert e.value.code == 141 and capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "stdout", _Stdout(OSError(errno.ENOSPC, "No space left on device")))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == ("error: standard output: cannot write to it (No space left on device); free disk space or "
                   "redirect it elsewhere\n"), err


def test_cli_absent_clause_prints_not_found(tiny_model_dir, contract_file, capsys):
    # the real (random, untrained) tiny model: whatever it writes does not match the contract
    assert main(["--model", str(tiny_model_dir), "--contract", str(contract_file), "--clause", "Non-Compete",
                 "--seq-len", "4096", "--max-new-tokens", "4", "--min-score", "95", "--decode", "free"]) == 0
    assert capsys.readouterr().out.strip() == "No Non-Compete clause found."


def test_cli_constrained_quotes_are_slices_of_the_file_with_progress(tiny_model_dir, contract_file, capsys):
    # the random tiny model under constrained decoding: whatever it picks is the file's own text, with offsets
    assert main(["--model", str(tiny_model_dir), "--contract", str(contract_file), "--clause", "Governing Law",
                 "--seq-len", "900", "--max-new-tokens", "6", "--json"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    raw = contract_file.read_bytes().decode("utf-8")
    assert re.search(r"reading \d+/\d+ windows", captured.err)  # progress over the windows, on stderr
    for m in res["matches"]:
        assert raw[m["start"]:m["end"]] == m["text"] and m["verbatim"] and m["copy_score"] == 100.0


def test_cli_channel_quotes_whole_paragraphs_of_the_file(tiny_model_dir, contract_file, tmp_path, capsys):
    """--decode channel: every match is a slice of the file holding one paragraph (whole, unless a window edge
    cut it) with its offsets; a rule that never quotes (a JSON file, as engine.calibrate writes) finds nothing."""
    from model.channel import paragraphs

    raw = contract_file.read_bytes().decode("utf-8")
    spans = paragraphs(raw)
    args = ["--model", str(tiny_model_dir), "--contract", str(contract_file), "--clause", "Governing Law",
            "--seq-len", "900", "--decode", "channel", "--quiet"]
    always = tmp_path / "always.json"
    always.write_text(json.dumps({"weights": {"gain": 0.0}, "bias": 1.0}))
    assert main(args + ["--channel-rule", str(always), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["found"] and res["matches"]
    for m in res["matches"]:
        assert raw[m["start"]:m["end"]] == m["text"]
        assert any(a <= m["start"] and m["end"] <= b for a, b in spans)  # within one paragraph of the file
    never = tmp_path / "never.json"
    never.write_text(json.dumps({"weights": {"gain": 0.0}, "bias": -1.0}))
    assert main(args + ["--channel-rule", str(never)]) == 0
    assert capsys.readouterr().out.strip() == "No Governing Law clause found."
    # --clause all: every category's query over each paragraph, every quote one paragraph of the file; the rule
    # applies to each (one that never quotes finds nothing anywhere)
    every = [a if a != "Governing Law" else "all" for a in args]
    assert main(every + ["--channel-rule", str(always), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["clauses"]) == 40 and all(r["found"] for r in res["clauses"].values())
    for r in res["clauses"].values():
        assert raw[r["start"]:r["end"]] == r["text"] and any(a <= r["start"] and r["end"] <= b for a, b in spans)
    assert main(every + ["--channel-rule", str(never), "--json"]) == 0
    assert not any(r["found"] for r in json.loads(capsys.readouterr().out)["clauses"].values())


@pytest.mark.parametrize("flag", [["--batch-size", "0"], ["--max-new-tokens", "-5"], ["--min-score", "120"]])
def test_cli_bad_numbers_are_refused_before_loading(tmp_path, contract_file, capsys, flag):
    assert main(["--model", str(tmp_path / "no-such-model"), "--contract", str(contract_file),
                 "--clause", "Governing Law"] + flag) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and flag[0] in err and "no-such-model" not in err


@pytest.mark.parametrize("flag", ["--adapter", "--focus-adapter"])
def test_a_wrong_adapter_directory_is_named_before_the_model_loads(tmp_path, contract_file, capsys, monkeypatch, flag):
    """--focus-adapter was read only after the model had loaded (minutes for a 3B on a T4), and its error said
    --adapter."""
    import engine.extract

    monkeypatch.setattr(engine.extract, "load_for_eval", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["--contract", str(contract_file), "--clause", "Governing Law", "--decode", "channel",
                 flag, str(tmp_path / "nowhere")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and f"{flag} must be a PEFT adapter directory" in err, err


@pytest.mark.parametrize("kind", ["missing", "directory", "binary", "empty"])
def test_cli_unreadable_contract_is_a_one_line_error(tmp_path, capsys, kind):
    p = tmp_path / "c.txt"
    if kind == "directory":
        p.mkdir()
    elif kind == "binary":
        p.write_bytes(b"%PDF-1.4\xff\xfe\x00\x01")
    elif kind == "empty":
        p.write_text("  \n")
    assert main(["--contract", str(p), "--clause", "Governing Law"]) != 0
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.startswith("error:") and "\n" not in err and str(p) in err and cap.out == ""


@pytest.mark.parametrize("module", ["engine.evaluate", "engine.extract", "engine.export"])
def test_cli_help_and_usage_errors(module, capsys):
    import importlib

    cli = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "usage: python -m " + module in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main([])  # required arguments missing
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "\n" not in err


def test_cli_clause_all_answers_every_category_in_one_pass(tiny_model_dir, contract_file, capsys):
    from engine.extract import ALL_CATEGORIES

    args = ["--model", str(tiny_model_dir), "--contract", str(contract_file), "--clause", "all",
            "--seq-len", "1400", "--max-new-tokens", "4"]
    assert main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    raw = contract_file.read_bytes().decode("utf-8")
    assert list(res["clauses"]) == list(ALL_CATEGORIES) and "Parties" not in res["clauses"]
    assert res["windows"] > 1
    for r in res["clauses"].values():  # whatever the random model picks is the file's own text
        assert not r["found"] or raw[r["start"]:r["end"]] == r["text"]
    assert main(args + ["--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["category", "found", "characters"] and len(out) == 1 + len(ALL_CATEGORIES)
    assert main(args + ["--decode", "free"]) != 0  # free text cannot be located for 40 types at once


def test_adapter_provenance_reads_the_runs_config_whichever_command_wrote_it(tmp_path):
    import json

    from engine.extract import adapter_provenance

    run = tmp_path / "run"
    (run / "checkpoints" / "step-3" / "adapter").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": "acord:/d", "train_split": "train", "max_steps": 9,
                                                 "seq_len": 1024}))  # engine.train
    assert adapter_provenance(run / "checkpoints" / "step-3" / "adapter") == \
        "trained on acord:/d (split train), step 3 of a run of 9 steps, seq_len 1024"
    (run / "config.json").write_text(json.dumps({"data": "acord:/d", "split": "fit", "max_steps": 410}))  # channel
    assert adapter_provenance(run / "adapter") == "trained on acord:/d (split fit), 410 steps"
    assert "unknown" in adapter_provenance(tmp_path / "nowhere" / "adapter")


def test_channel_all_in_one_pass_finds_what_each_clause_type_alone_finds(tiny_model_dir):
    """--clause all --decode channel reads each window's paragraphs once for every category
    (channel_all_answerer); per category that must give what find_clause finds asking that category alone, over
    the same windows: the same quotes in the same order, under a rule that quotes anything and one that quotes
    about half (its bar the median confidence of the first: the random model's gains are all below the default
    rule's 0, which would quote nothing)."""
    import statistics

    from engine.evaluate import load_for_eval
    from engine.extract import channel_all_answerer, find_all, window_answerer
    from model.channel import ChannelRule

    model, tok, _ = load_for_eval(str(tiny_model_dir), None, device="cpu", precision="fp32")
    text, count = _contract(), (lambda s: len(tok.encode(s)))
    categories = ["Governing Law", "Audit Rights", "Anti-Assignment"]
    rule = ChannelRule(weights={"gain": 0.0}, bias=1.0)
    every = None
    for _ in range(2):
        together, n = find_all(text, categories, channel_all_answerer(model, tok, rule=rule), count, 700)
        assert n > 3
        for c in categories:
            alone, m = find_clause(text, c, window_answerer(model, tok, decode="channel", query=c, rule=rule),
                                   count, 700)
            assert m == n
            assert [(q.start, q.end, q.window) for q in together[c]] == [(q.start, q.end, q.window) for q in alone]
        found = sum(len(q) for q in together.values())
        if every is None:
            assert all(together.values())  # a rule that quotes anything: every category found something
            every = found
            rule = ChannelRule(weights={"gain": 1.0},
                               bias=-statistics.median(q.logprob for m in together.values() for q in m))
        else:
            assert 0 < found < every


def test_channel_all_trims_each_categorys_quote_with_its_own_focus(tiny_model_dir, monkeypatch):
    """--clause all --decode channel --focus-adapter: each category's chosen unit is trimmed by the focus stage
    prompted with that category (engine.evaluate.focuser per category), as asking the category alone does."""
    import engine.extract
    from engine.evaluate import load_for_eval
    from engine.extract import channel_all_answerer, find_all, window_answerer
    from model.channel import ChannelRule

    asked = []

    def fake_focuser(model, tok, bank, ex, max_new_tokens):  # keeps the first len(query) % 5 + 1 characters
        def focus(text):
            asked.append(ex.query)
            return 0, len(ex.query) % 5 + 1
        return focus
    monkeypatch.setattr(engine.extract, "focuser", fake_focuser)
    model, tok, _ = load_for_eval(str(tiny_model_dir), None, device="cpu", precision="fp32")
    text, count = _contract(), (lambda s: len(tok.encode(s)))
    rule = ChannelRule(weights={"gain": 0.0}, bias=1.0)
    categories = ["Governing Law", "Audit Rights", "Anti-Assignment"]
    together, _ = find_all(text, categories, channel_all_answerer(model, tok, rule=rule, focus=object()), count, 700)
    assert set(asked) == set(categories)
    for c in categories:
        alone, _ = find_clause(text, c, window_answerer(model, tok, decode="channel", query=c, rule=rule,
                                                        focus=object()), count, 700)
        assert together[c] and [(q.start, q.end) for q in together[c]] == [(q.start, q.end) for q in alone]
        assert all(q.end - q.start == len(c) % 5 + 1 for q in together[c])


def test_several_contracts_one_model_load_one_json_line_each(tiny_model_dir, contract_file, tmp_path, capsys,
                                                             monkeypatch):
    """--contract A DIR: the files, then the directory's *.txt files in name order, each answered as when it is
    the only one (the same JSON object), the model loaded once; --json gives one line per contract."""
    import engine.extract

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_bytes(_contract().replace("Delaware", "Ohio").encode("utf-8"))
    (folder / "a.txt").write_bytes(_contract()[:1500].encode("utf-8"))
    (folder / "notes.md").write_text("not a contract")  # not *.txt: left out
    base = ["--model", str(tiny_model_dir), "--clause", "Governing Law", "--seq-len", "900", "--decode", "channel",
            "--quiet", "--json"]
    alone = []
    for f in (contract_file, folder / "a.txt", folder / "b.txt"):
        assert main(base + ["--contract", str(f)]) == 0
        alone.append(json.loads(capsys.readouterr().out))
    loads = []
    real = engine.extract.load_for_eval
    monkeypatch.setattr(engine.extract, "load_for_eval", lambda *a, **k: loads.append(1) or real(*a, **k))
    assert main(base + ["--contract", str(contract_file), str(folder), str(contract_file)]) == 0  # once each
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line) for line in lines] == alone and len(loads) == 1
    # the text form: a header per contract
    assert main([a for a in base if a != "--json"] + ["--contract", str(folder)]) == 0
    out = capsys.readouterr().out
    first, second = f"== {folder / 'a.txt'} (1 of 2)", f"== {folder / 'b.txt'} (2 of 2)"
    assert first in out and second in out and out.index(first) < out.index(second)


def test_several_contracts_are_all_checked_before_the_model_loads(tmp_path, contract_file, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, says in ((tmp_path / "gone.txt", "gone.txt: contract file not found"),
                      (empty, "empty: no .txt contract files in this directory")):
        assert main(["--model", str(tmp_path / "no-such-model"), "--clause", "Governing Law",
                     "--contract", str(contract_file), str(bad)]) == 1
        err = capsys.readouterr().err.strip()
        assert says in err and "no-such-model" not in err and "\n" not in err


# ---- line endings, answers cut short, window budgets -----------------------------------------------------------
def _paragraphed(newline: str) -> str:
    """A contract of blank-line separated paragraphs, lines ending in `newline`."""
    paras = [f"{i}. Section {i}. The parties agree to item number {i} as described\nin Exhibit {i}."
             for i in range(1, 30)]
    paras.insert(20, "21. Governing Law. " + CLAUSE.replace("\r\n", "\n"))
    return ("MASTER SERVICES AGREEMENT\n\n" + "\n\n".join(paras) + "\n").replace("\n", newline)


@pytest.mark.parametrize("decode", ["channel", "constrained"])
def test_crlf_contract_reads_as_lf_and_quotes_the_files_own_text(tiny_model_dir, tmp_path, capsys, decode):
    """Windows line endings: the model reads the contract as LF text (paragraphs found, the same answers as the
    LF file's); the offsets are the CRLF file's and its slice, CRLF kept, is the quote."""
    files = {}
    for name, newline in (("lf", "\n"), ("crlf", "\r\n")):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_bytes(_paragraphed(newline).encode("utf-8"))
    always = tmp_path / "always.json"
    always.write_text(json.dumps({"weights": {"gain": 0.0}, "bias": 1.0}))
    got = {}
    for name, f in files.items():
        args = ["--model", str(tiny_model_dir), "--contract", str(f), "--clause", "Governing Law", "--seq-len",
                "900", "--max-new-tokens", "6", "--decode", decode, "--quiet", "--json"]
        assert main(args + (["--channel-rule", str(always)] if decode == "channel" else [])) == 0
        got[name] = json.loads(capsys.readouterr().out)
    lf, crlf = got["lf"], got["crlf"]
    raw = files["crlf"].read_bytes().decode("utf-8")
    assert crlf["found"] and crlf["windows"] == lf["windows"] > 1
    assert [m["text"].replace("\r\n", "\n") for m in crlf["matches"]] == [m["text"] for m in lf["matches"]]
    for m in crlf["matches"]:
        assert raw[m["start"]:m["end"]] == m["text"] and not m["text"].endswith("\r")
        if decode == "channel":  # one paragraph, not the whole window
            assert "\r\n\r\n" not in m["text"]
    assert [(w["start"], w["end"]) for w in crlf["per_window"]] != [(w["start"], w["end"]) for w in lf["per_window"]]
    assert crlf["per_window"][-1]["end"] == len(raw)


def test_to_lf_maps_every_offset_back_to_the_file():
    from engine.extract import to_lf

    text = "a\r\nb\rc\n\r\nd"
    lf, where = to_lf(text)
    assert lf == "a\nb\nc\n\nd" and len(where) == len(lf) + 1 and where[-1] == len(text)
    for i in range(len(lf)):
        for j in range(i + 1, len(lf) + 1):
            assert text[where[i]:where[j]].replace("\r\n", "\n").replace("\r", "\n") == lf[i:j]


def _cut_decode_span(model, tok, prompt, ctx, max_new_tokens=384, **kw):
    """A decode_span that copies the first 20 characters of the clause where its window holds it, as a model
    cut off by max_new_tokens would, else answers NONE."""
    from model.generate import Answer

    i = ctx.find(CLAUSE[:20])
    if i < 0:
        return Answer("NONE", None, None, -0.1, 1, 1)
    return Answer(ctx[i:i + 20], i, i + 20, -0.1, max_new_tokens, 1, truncated=True)


def test_answers_cut_at_max_new_tokens_are_flagged(tiny_model_dir, contract_file, monkeypatch, capsys):
    import engine.extract

    monkeypatch.setattr(engine.extract, "decode_span", _cut_decode_span)
    args = ["--model", str(tiny_model_dir), "--contract", str(contract_file), "--clause", "Governing Law",
            "--seq-len", "900", "--max-new-tokens", "7", "--quiet"]
    assert main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["found"] and res["truncated"] and all(m["truncated"] for m in res["matches"])
    assert main(args) == 0
    cap = capsys.readouterr()
    assert CLAUSE[:20] in cap.out
    warning = [line for line in cap.err.splitlines() if "cut at --max-new-tokens 7" in line]
    assert len(warning) == 1 and "raise it" in warning[0]
    # free decoding: generate says whether a stop token ended each answer
    monkeypatch.setattr(engine.extract, "generate", _fake_generate(lambda c: c, ended=False))
    assert main(args + ["--decode", "free", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["truncated"] is True
    monkeypatch.setattr(engine.extract, "generate", _fake_generate(lambda c: c, ended=True))
    assert main(args + ["--decode", "free", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["truncated"] is False


def test_clause_all_marks_answers_cut_at_max_new_tokens(tiny_model_dir, contract_file, monkeypatch, capsys):
    import engine.extract

    def decode_spans(model, tok, prompts, ctx, max_new_tokens=384, progress=None, **kw):
        return [_cut_decode_span(model, tok, p, ctx, max_new_tokens) for p in prompts]
    monkeypatch.setattr(engine.extract, "decode_spans", decode_spans)
    args = ["--model", str(tiny_model_dir), "--contract", str(contract_file), "--clause", "all",
            "--seq-len", "1400", "--max-new-tokens", "7", "--quiet"]
    assert main(args + ["--json"]) == 0
    clauses = json.loads(capsys.readouterr().out)["clauses"]
    assert all(r["found"] and r["truncated"] for r in clauses.values())
    assert main(args) == 0
    cap = capsys.readouterr()
    assert all(" yes* " in line for line in cap.out.splitlines()[1:])
    assert "40 answer(s) (yes*) cut at --max-new-tokens 7" in cap.err


def test_seq_len_too_short_for_the_answer_is_refused_before_the_model_loads(tmp_path, contract_file, monkeypatch,
                                                                           capsys):
    import engine.extract

    def load(*a, **kw):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(engine.extract, "load_for_eval", load)
    assert main(["--model", str(tmp_path / "model"), "--contract", str(contract_file), "--clause", "Governing Law",
                 "--seq-len", "300", "--max-new-tokens", "384"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --seq-len 300") and "--max-new-tokens 384" in err and "loaded" not in err


def test_channel_windows_leave_no_room_for_an_answer_it_never_generates(tiny_model_dir, contract_file, tmp_path,
                                                                       capsys):
    """--decode channel generates nothing after a window's prompt: --max-new-tokens (for --focus-adapter's copy
    out of one unit) does not shrink its windows, and a --seq-len below it is no error."""
    from engine.extract import answer_budget, window_budget
    from model import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    assert window_budget(tok, "Governing Law", 900, answer_budget("channel", 384)) == \
        window_budget(tok, "Governing Law", 900, answer_budget("constrained", 0))
    assert answer_budget("constrained", 384) == answer_budget("rank", 384) == 384
    always = tmp_path / "always.json"
    always.write_text(json.dumps({"weights": {"gain": 0.0}, "bias": 1.0}))
    assert main(["--model", str(tiny_model_dir), "--contract", str(contract_file), "--clause", "Governing Law",
                 "--seq-len", "400", "--max-new-tokens", "384", "--decode", "channel", "--channel-rule",
                 str(always), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["found"]


def test_a_focus_copy_cut_at_max_new_tokens_flags_the_channel_quote(tiny_model_dir, monkeypatch):
    """--decode channel quotes a unit whole, never cut; a --focus-adapter's trim is a copy that can reach
    --max-new-tokens, and then the quote is flagged truncated, for one clause type and for all."""
    import engine.extract
    from engine.evaluate import load_for_eval
    from engine.extract import channel_all_answerer, find_all, window_answerer
    from model.channel import ChannelRule

    def fake_focuser(model, tok, bank, ex, max_new_tokens):  # Audit Rights' copy runs out of tokens
        def focus(text):
            focus.truncated = ex.query == "Audit Rights"
            return 0, 5
        return focus
    monkeypatch.setattr(engine.extract, "focuser", fake_focuser)
    model, tok, _ = load_for_eval(str(tiny_model_dir), None, device="cpu", precision="fp32")
    text, count = _contract(), (lambda s: len(tok.encode(s)))
    rule = ChannelRule(weights={"gain": 0.0}, bias=1.0)
    categories = ["Governing Law", "Audit Rights"]
    together, _ = find_all(text, categories, channel_all_answerer(model, tok, rule=rule, focus=object()), count, 700)
    for c in categories:
        alone, _ = find_clause(text, c, window_answerer(model, tok, decode="channel", query=c, rule=rule,
                                                        focus=object()), count, 700)
        assert alone and together[c]
        assert {q.truncated for q in alone} == {q.truncated for q in together[c]} == {c == "Audit Rights"}
