"""engine.demo: the page's handler (quotes highlighted at the extraction's offsets, escaped HTML, NONE, bad input
as a message), gradio kept optional, and the page itself driven in headless Chromium when one is installed.

The handler runs on a tiny random Llama: once with a scripted decode_span (the clause "found" where its window
holds it) to pin offsets, once with the real constrained decoding to pin that it is engine.extract's path.
"""
import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.demo import Reader, answer, build_app, highlight, main, resolve_clause
from engine.extract import find_clause, window_answerer, window_budget
from model.generate import Answer
from tests.browser_demo import CLAUSE, CONTRACT, find_browser
from tests.test_evaluate import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    from engine.evaluate import load_for_eval

    model, tok, _ = load_for_eval(str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny-demo") / "model")), None)
    return Reader(model, tok, seq_len=1400, max_new_tokens=6)


@pytest.fixture
def scripted(monkeypatch):
    """decode_span that answers CLAUSE, with its offsets in the window, where the window holds it, else NONE."""
    import engine.extract

    def decode_span(model, tok, prompt, ctx, **kw):
        i = ctx.find(CLAUSE)
        return Answer(CLAUSE, i, i + len(CLAUSE), -0.1, 9, 9) if i >= 0 else Answer("NONE", None, None, -0.1, 1, 1)
    monkeypatch.setattr(engine.extract, "decode_span", decode_span)


class NoModel:
    """A reader that must not be asked: bad input is refused before any decoding."""

    def one(self, text, clause):
        raise AssertionError("the model was asked")

    all = one


def _plain(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def test_highlight_offsets_equal_the_extraction_offsets(reader, scripted):
    res = answer(reader, CONTRACT, None, "governing  law")
    start = CONTRACT.index(CLAUSE)
    assert res.ok and res.spans == [(start, start + len(CLAUSE), "Governing Law")]
    assert res.rows == [["Governing Law", "yes", start, start + len(CLAUSE), res.rows[0][4]]]
    assert f"characters {start}-{start + len(CLAUSE)}" in res.summary
    mark = re.search(r'<mark data-start="(\d+)" data-end="(\d+)"[^>]*>(.*?)</mark>', res.html, re.S)
    assert (int(mark[1]), int(mark[2])) == (start, start + len(CLAUSE)) and html.unescape(mark[3]) == CLAUSE
    assert len(_plain(res.html[:mark.start()])) == start  # the mark sits at that offset of the shown text
    assert _plain(res.html) == CONTRACT  # every character shown once, in order


def test_handler_runs_the_extract_commands_path(reader):
    # the real constrained decoding of the random model: the page shows what engine.extract finds, nothing else
    res = answer(reader, CONTRACT, None, "Governing Law")
    tok = reader.tok
    budget = window_budget(tok, "Governing Law", reader.seq_len, reader.max_new_tokens)
    matches, _ = find_clause(CONTRACT, "Governing Law", window_answerer(reader.model, tok, max_new_tokens=6),
                             lambda s: len(tok.encode(s)), budget)
    assert res.spans == [(m.start, m.end, "Governing Law") for m in matches[:1]]
    assert _plain(res.html) == CONTRACT


def test_channel_decoding_runs_the_extract_commands_channel_path(reader):
    """Reader(decode="channel"): one clause type as find_clause with the channel window_answerer finds it, and
    "all" (each unit read once for every type) as asking each type alone finds it, under a rule that quotes."""
    from engine.extract import ALL_CATEGORIES
    from model.channel import ChannelRule, paragraphs

    rule = ChannelRule(weights={"gain": 0.0}, bias=1.0)
    ch = Reader(reader.model, reader.tok, reader.seq_len, reader.max_new_tokens, decode="channel", rule=rule)
    tok, count = reader.tok, (lambda s: len(reader.tok.encode(s)))
    res = answer(ch, CONTRACT, None, "Governing Law")
    budget = window_budget(tok, "Governing Law", ch.seq_len, ch.max_new_tokens)
    matches, _ = find_clause(CONTRACT, "Governing Law", window_answerer(reader.model, tok, decode="channel",
                                                                       query="Governing Law", rule=rule),
                             count, budget)
    assert matches and res.spans == [(matches[0].start, matches[0].end, "Governing Law")]
    assert (matches[0].start, matches[0].end) in paragraphs(CONTRACT)  # a whole paragraph: the channel's answer
    res = answer(ch, CONTRACT, None, "all")
    budget = window_budget(tok, "all", ch.seq_len, ch.max_new_tokens)  # "all"'s windows: its longest prompt
    alone = {c: find_clause(CONTRACT, c, window_answerer(reader.model, tok, decode="channel", query=c, rule=rule),
                            count, budget)[0] for c in ALL_CATEGORIES}  # each type asked on its own
    assert sorted(res.spans) == sorted((m[0].start, m[0].end, c) for c, m in alone.items())
    assert len(res.spans) == len(ALL_CATEGORIES)  # the rule quotes: every type found


def test_the_command_reads_a_channel_adapter_as_it_was_trained(reader, monkeypatch, tmp_path, capsys):
    """An adapter whose run engine.channel_train wrote gets --decode channel and its --unit, with a note, as in
    engine.extract; --decode overrides; a channel-only flag without channel decoding is refused."""
    import json

    import engine.demo

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"data": "acord:/d", "split": "fit", "groups_per_step": 4,
                                                 "unit": "sentence"}))
    built = []
    monkeypatch.setattr(engine.demo, "load_for_eval", lambda *a, **k: (reader.model, reader.tok, "tiny"))
    monkeypatch.setattr(engine.demo, "build_app", lambda r, title: built.append((r, title)) or _NoLaunch())
    monkeypatch.setattr(engine.demo, "_gradio", lambda: None)
    assert main(["--adapter", str(run / "adapter")]) == 0
    r, title = built[-1]
    assert (r.decode, r.unit, r.rule) == ("channel", "sentence", None) and "channel decoding" in title
    assert "--decode channel --channel-unit sentence" in capsys.readouterr().err
    assert main(["--adapter", str(run / "adapter"), "--decode", "constrained"]) == 0
    assert built[-1][0].decode == "constrained" and "constrained decoding" in built[-1][1]
    assert main(["--channel-unit", "sentence"]) == 1  # no adapter: constrained, so the flag means nothing
    assert "--channel-unit is what --decode channel quotes" in capsys.readouterr().err


class _NoLaunch:
    def launch(self, **kw):
        return None


def test_contract_markup_is_escaped():
    text = 'Fees < $500 & "costs"; <script>alert(1)</script> end.'
    page = highlight(text, [(text.index("<script>"), len(text), "Audit Rights")])
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp;" in page
    assert _plain(page) == text


def test_overlapping_quotes_are_cut_at_every_edge():
    text = "0123456789"
    page = highlight(text, [(2, 6, "A"), (4, 8, "B")])
    marks = re.findall(r'<mark data-start="(\d+)" data-end="(\d+)" title="([^"]*)">', page)
    assert [(int(a), int(b)) for a, b, _ in marks] == [(2, 4), (4, 6), (6, 8)]
    assert "A, B" in marks[1][2] and _plain(page) == text


def test_absent_clause_says_none(reader, monkeypatch):
    import engine.extract

    monkeypatch.setattr(engine.extract, "decode_span", lambda *a, **kw: Answer("NONE", None, None, -0.1, 1, 1))
    res = answer(reader, CONTRACT, None, "Non-Compete")
    assert res.ok and "Non-Compete: NONE" in res.summary and res.spans == []
    assert "<mark" not in res.html and res.rows == [["Non-Compete", "NONE", "", "", ""]]


def test_all_gives_one_row_per_clause_type(reader):
    from engine.extract import ALL_CATEGORIES

    res = answer(reader, CONTRACT, None, "ALL")
    assert res.ok and [r[0] for r in res.rows] == list(ALL_CATEGORIES)
    assert re.match(rf"\d+ of {len(ALL_CATEGORIES)} clause types found", res.summary)
    for category, found, start, end, _ in res.rows:  # whatever the random model picks is the contract's text
        assert found == "NONE" or (start, end, category) in res.spans
    assert _plain(res.html) == CONTRACT


@pytest.mark.parametrize("contract, upload, clause, says", [
    ("", None, "Governing Law", "the contract is empty"),
    ("  \n\t", None, "Governing Law", "the contract is empty"),
    (CONTRACT, None, "Favourite Colour", "unknown clause type 'Favourite Colour'"),
    (CONTRACT, None, None, "no clause type chosen"),
    ("", "binary", "Governing Law", "contract.pdf: not UTF-8 text"),
    ("", "missing", "Governing Law", "gone.txt: contract file not found"),
])
def test_bad_input_is_a_message_in_the_page(tmp_path, contract, upload, clause, says):
    if upload == "binary":
        upload = tmp_path / "contract.pdf"
        upload.write_bytes(b"%PDF-1.4\xff\xfe\x00\x01")
    elif upload == "missing":
        upload = tmp_path / "gone.txt"
    res = answer(NoModel(), contract, str(upload) if upload else None, clause)
    assert not res.ok and res.summary.startswith("error: ") and says in res.summary and "\n" not in res.summary
    assert str(tmp_path) not in res.summary  # the upload's name, not the server's temp path
    assert html.escape(res.summary) in res.html


def test_an_upload_is_read_as_the_files_text(tmp_path, scripted, reader):
    p = tmp_path / "c.txt"
    p.write_bytes(CONTRACT.replace("\n", "\r\n").encode("utf-8"))
    res = answer(reader, "ignored", str(p), "Governing Law")
    start = p.read_bytes().decode("utf-8").index(CLAUSE)  # offsets count the file's \r\n
    assert res.spans == [(start, start + len(CLAUSE), "Governing Law")] and "uploaded file c.txt" in res.summary


def test_clause_names_resolve_to_cuad_spelling():
    assert resolve_clause(" governing LAW ") == "Governing Law" and resolve_clause("All") == "all"


def test_engine_never_imports_gradio():
    code = ("import sys, engine.demo, engine.extract, engine.evaluate, engine.train, model, data; "
            "sys.exit('gradio' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
    for pkg in ("engine", "model", "data"):
        for f in (REPO / pkg).rglob("*.py"):
            if f.name != "demo.py":
                assert not re.search(r"^\s*(import|from)\s+gradio\b", f.read_text(encoding="utf-8"), re.M), f


def test_without_gradio_the_command_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    with pytest.raises(ImportError, match=re.escape("pip install -e '.[demo]'")):
        build_app(NoModel())
    assert main(["--model", str(tmp_path / "no-such-model")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "[demo]" in err and "no-such-model" not in err and "\n" not in err


def test_bad_flags_are_refused_in_one_line(capsys):
    assert main(["--port", "70000"]) == 1 and "--port 70000" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "usage: python -m engine.demo" in capsys.readouterr().out


def test_the_page_in_headless_chromium(tmp_path, request):
    """tests/browser_demo.py: the real demo (embedded model) driven by Chromium, checked, a screenshot saved."""
    for module in ("gradio", "selenium"):
        if sys.modules.get(module, ...) is None or importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[demo]'); the browser test needs it")
    if find_browser() is None:
        pytest.skip("no chromium + chromedriver (apt-get install -y chromium chromium-driver)")
    request.getfixturevalue("smollm_gguf")
    shot = tmp_path / "demo.png"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "browser_demo.py"), str(shot), "--timeout", "240"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok: Governing Law: characters") and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# a clause over two lines: pasted into the page, its line ends may arrive as CRLF (browsers differ)
TWO_LINES = "This Agreement is governed by the laws of Delaware,\nwithout regard to conflict of laws."
LF_CONTRACT = f"SUPPLY AGREEMENT\n\n1. Term. Five years.\n\n2. Governing Law. {TWO_LINES}\n\n3. Notices. In writing.\n"


def test_pasted_crlf_text_is_read_as_lf_with_offsets_into_the_pasted_text(reader, monkeypatch):
    """The page reads a contract as engine.extract reads a file: the model sees LF line endings (what it was
    trained on, and what a constrained copy must match), the offsets shown are the pasted text's own, CRs
    counted; for one clause type and for all."""
    import engine.extract

    def reads_lf(ctx):
        assert "\r" not in ctx, "the model was shown CR characters"
        i = ctx.find(TWO_LINES)
        return (i, i + len(TWO_LINES)) if i >= 0 else None

    def decode_span(model, tok, prompt, ctx, **kw):
        at = reads_lf(ctx)
        return Answer(TWO_LINES, *at, -0.1, 9, 9) if at else Answer("NONE", None, None, -0.1, 1, 1)

    def decode_spans(model, tok, prompts, ctx, progress=None, **kw):
        return [decode_span(model, tok, p, ctx) for p in prompts]
    monkeypatch.setattr(engine.extract, "decode_span", decode_span)
    monkeypatch.setattr(engine.extract, "decode_spans", decode_spans)
    pasted = LF_CONTRACT.replace("\n", "\r\n")
    start = pasted.index(TWO_LINES.replace("\n", "\r\n"))
    end = start + len(TWO_LINES) + 1  # one CR inside
    res = answer(reader, pasted, None, "Governing Law")
    assert res.ok and res.spans == [(start, end, "Governing Law")], res.summary
    assert pasted[start:end] == TWO_LINES.replace("\n", "\r\n") and _plain(res.html) == pasted
    res = answer(reader, pasted, None, "all")
    assert res.ok and res.spans and all((a, b) == (start, end) for a, b, _ in res.spans)


def test_channel_windows_keep_no_room_for_an_answer(reader, monkeypatch, capsys):
    """--decode channel generates nothing after a window's prompt: the page's windows are extract's
    (engine.evaluate.answer_budget), and a --seq-len below --max-new-tokens is no error for it."""
    import engine.demo
    from model.channel import ChannelRule

    quote = ChannelRule(weights={"gain": 0.0}, bias=1.0)
    ch = Reader(reader.model, reader.tok, 400, 384, decode="channel", rule=quote)
    assert ch.budget("Governing Law") == window_budget(reader.tok, "Governing Law", 400, 0)
    res = answer(ch, LF_CONTRACT, None, "Governing Law")
    assert res.ok and res.spans and "1 window(s)" in res.summary
    assert answer(ch, LF_CONTRACT, None, "all").ok
    with pytest.raises(ValueError, match="--seq-len 400"):
        Reader(reader.model, reader.tok, 400, 384).budget("Governing Law")  # constrained: the answer needs room
    built = []
    monkeypatch.setattr(engine.demo, "load_for_eval", lambda *a, **k: (reader.model, reader.tok, "tiny"))
    monkeypatch.setattr(engine.demo, "build_app", lambda r, title: built.append(r) or _NoLaunch())
    monkeypatch.setattr(engine.demo, "_gradio", lambda: None)
    assert main(["--decode", "channel", "--seq-len", "400"]) == 0 and built[-1].decode == "channel"
    assert main(["--seq-len", "400"]) == 1  # constrained: refused before the model loads
    assert "--seq-len 400" in capsys.readouterr().err and len(built) == 1


def test_a_busy_port_is_one_line_before_the_model_loads(monkeypatch, capsys):
    """--port in use was found by gradio after the model had loaded, in its words (server_port in launch())."""
    import socket

    import engine.demo

    monkeypatch.setattr(engine.demo, "_gradio", lambda: None)
    monkeypatch.setattr(engine.demo, "load_for_eval", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --port {port} on 127.0.0.1: already in use") and "\n" not in err
    assert f"--port {port + 1}" in err and "server_port" not in err
    assert main(["--host", "no-such-host.invalid"]) == 1
    assert capsys.readouterr().err.startswith("error: --host no-such-host.invalid: not an address to serve on")
