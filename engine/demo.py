"""A contract-extraction demo in the browser: paste or upload a contract, pick a clause type (or all), see the
verbatim quote highlighted in the contract with its character offsets, or NONE.

    pip install -e '.[demo]'
    python -m engine.demo [--model SRC] [--adapter DIR] [--decode constrained|rank|channel]
                          [--channel-unit paragraph|sentence] [--channel-rule RULE_JSON] [--host 127.0.0.1]
                          [--port 7860] [--threads N]

The page runs what `python -m engine.extract` runs (window_budget, window_answerer + find_clause, find_all),
decoding as it does (an engine.channel_train adapter: --decode channel): every quote is a slice of the
contract. Offsets are character indices into the contract as the page received it (an upload decoded as UTF-8
with its line endings kept; pasted text as the browser sends it, with LF or CRLF line endings: browsers differ,
the Chromium of tests/browser_demo.py sends LF); the model reads either with LF line endings, as engine.extract
reads a file. gradio is imported only by build_app: the handler, `answer`, is plain Python.
"""
from __future__ import annotations

import argparse
import errno
import html
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from data.cuad import CATEGORIES
from engine.cli import THREADS_HELP, CliParser, run_command, set_threads
from engine.evaluate import answer_budget, choose_decoding, load_for_eval, read_rule, run_model_source
from engine.extract import (ALL_CATEGORIES, channel_all_answerer, find_all, find_clause, in_file, read_contract,
                            shared_prefill_answerer, to_lf, window_answerer, window_budget)
from model.channel import UNITS, ChannelRule

INSTALL_HINT = "the demo needs gradio: pip install -e '.[demo]'"
DECODES = ("constrained", "rank", "channel")  # engine.extract's, less free (no one pass serves every clause type)
TABLE_HEADERS = ["clause type", "found", "start", "end", "quote (first words)"]
CHOICES = ["all", *CATEGORIES]


@dataclass
class Reader:
    """The loaded model and the settings every query uses: the model is loaded once, at start. decode:
    "constrained", "rank" or "channel" (then unit and rule as engine.extract's --channel-unit and --channel-rule);
    every answer is a slice of the contract."""
    model: object
    tok: object
    seq_len: int = 2048
    max_new_tokens: int = 384
    decode: str = "constrained"
    unit: str = "paragraph"
    rule: ChannelRule | None = None

    def budget(self, clause: str) -> int:
        """Contract tokens per window, as engine.extract counts them (channel decoding keeps no room for an
        answer: engine.evaluate.answer_budget)."""
        return window_budget(self.tok, clause, self.seq_len, answer_budget(self.decode, self.max_new_tokens))

    def one(self, text: str, clause: str):
        """([Match], windows) for one clause type, as engine.extract --clause NAME finds them: the model reads the
        text with its line endings made LF (engine.extract.to_lf: a browser may send pasted text with CRLF), the
        offsets are the text's own."""
        answer_fn = window_answerer(self.model, self.tok, decode=self.decode, max_new_tokens=self.max_new_tokens,
                                    query=clause, rule=self.rule, unit=self.unit)
        lf, where = to_lf(text)
        found, n = find_clause(lf, clause, answer_fn, lambda s: len(self.tok.encode(s)), self.budget(clause))
        return [in_file(m, where) for m in found], n

    def all(self, text: str):
        """({category: [Match]}, windows), as engine.extract --clause all finds them (LF text, as one)."""
        if self.decode == "channel":
            answer_window = channel_all_answerer(self.model, self.tok, rule=self.rule, unit=self.unit)
        else:
            answer_window = shared_prefill_answerer(self.model, self.tok, max_new_tokens=self.max_new_tokens,
                                                    rank=self.decode == "rank")
        lf, where = to_lf(text)
        found, n = find_all(lf, ALL_CATEGORIES, answer_window, lambda s: len(self.tok.encode(s)), self.budget("all"))
        return {c: [in_file(m, where) for m in ms] for c, ms in found.items()}, n


@dataclass
class DemoAnswer:
    """What the page shows: a one-line summary, the contract as HTML with the quotes in <mark>, a table."""
    summary: str
    html: str = ""
    rows: list = field(default_factory=list)
    spans: list = field(default_factory=list)  # (start, end, clause type) of every quote highlighted
    ok: bool = True


def resolve_clause(name) -> str:
    """A CUAD category as spelled in data.cuad.CATEGORIES (any case and spacing), or "all"."""
    key = " ".join(str(name or "").split()).lower()
    if not key:
        raise ValueError("no clause type chosen: pick one from the list, or 'all'")
    if key == "all":
        return "all"
    for c in CATEGORIES:
        if c.lower() == key:
            return c
    raise ValueError(f"unknown clause type {name!r}: pick one from the list (e.g. 'Governing Law'), or 'all'")


def contract_text(pasted, upload) -> tuple[str, str]:
    """(text, where it came from). An upload wins over pasted text; its errors name the file, not a temp path."""
    if upload:
        path = Path(getattr(upload, "name", upload))  # gradio passes a path; older versions a tempfile wrapper
        try:
            return read_contract(path), f"uploaded file {path.name}"
        except (OSError, ValueError) as e:
            raise ValueError(str(e).replace(str(path), path.name)) from None
    if not isinstance(pasted, str) or not pasted.strip():
        raise ValueError("the contract is empty: paste its text, or upload a UTF-8 .txt file")
    if "\x00" in pasted:
        raise ValueError("the pasted contract holds NUL characters: paste plain text")
    return pasted, "pasted text"


def highlight(text: str, spans) -> str:
    """The contract as escaped HTML, every (start, end, label) span in a <mark> carrying its offsets.

    Spans may overlap (clause types in "all" can share text): the text is cut at every span edge and each piece
    is marked with all the labels that cover it, so every character appears once and offsets stay exact."""
    cuts = sorted({0, len(text), *(s for s, _, _ in spans), *(e for _, e, _ in spans)})
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        piece = html.escape(text[a:b])
        labels = [lab for s, e, lab in spans if s <= a and b <= e]
        if labels:
            title = html.escape(f"{', '.join(labels)}: characters {a}-{b}")
            piece = f'<mark data-start="{a}" data-end="{b}" title="{title}">{piece}</mark>'
        parts.append(piece)
    return f'<pre class="contract" style="white-space: pre-wrap; font-size: 0.9em">{"".join(parts)}</pre>'


def _first_words(quote: str, n: int = 12) -> str:
    words = quote.split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")


def _error(message: str) -> DemoAnswer:
    shown = html.escape(f"error: {message}")
    return DemoAnswer(summary=f"error: {message}", html=f'<p class="error" style="color: #b00">{shown}</p>', ok=False)


def answer(reader, contract, upload, clause) -> DemoAnswer:
    """The page's handler: (pasted text, uploaded file path or None, clause type or "all") -> DemoAnswer.
    Bad input comes back as a message, never an exception."""
    try:
        name = resolve_clause(clause)
        text, where = contract_text(contract, upload)
    except ValueError as e:
        return _error(str(e))
    t0 = time.perf_counter()
    if name == "all":
        found, n_windows = reader.all(text)
        best = {c: m[0] for c, m in found.items() if m}
    else:
        matches, n_windows = reader.one(text, name)
        found, best = {name: matches}, ({name: matches[0]} if matches else {})
    took = time.perf_counter() - t0
    spans = [(m.start, m.end, c) for c, m in best.items()]
    rows = [[c, "yes", best[c].start, best[c].end, _first_words(text[best[c].start:best[c].end])] if c in best
            else [c, "NONE", "", "", ""] for c in found]
    read = f"{where}, {len(text)} characters, {n_windows} window(s), {took:.1f} s"
    if name == "all":
        summary = f"{len(best)} of {len(found)} clause types found ({read})"
    elif best:
        m = best[name]
        summary = f"{name}: characters {m.start}-{m.end} ({read})"
    else:
        summary = f"{name}: NONE, no such clause found ({read})"
    return DemoAnswer(summary=summary, html=highlight(text, spans), rows=rows, spans=spans)


def _gradio():
    """gradio, imported only when a page is built: the engine and its tests run without it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a local demo
    try:
        import gradio as gr
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return gr


def build_app(reader, title: str = "clauselora"):
    """The gradio page around `answer` (one query at a time: gradio's queue runs one event per function)."""
    gr = _gradio()

    def on_find(contract, upload, clause):
        try:
            res = answer(reader, contract, upload, clause)
        except Exception as e:  # noqa: BLE001 - the page is the boundary: one line there, the traceback here
            traceback.print_exc()
            res = _error(f"extraction failed: {' '.join(str(e).split()) or type(e).__name__}")
        return res.summary, res.html, res.rows

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {html.escape(title)}: find a clause, quoted verbatim from the contract")
        with gr.Row():
            with gr.Column(scale=1):
                contract = gr.Textbox(label="Contract (paste plain text)", lines=14, max_lines=30,
                                      elem_id="contract")
                upload = gr.File(label="…or upload a UTF-8 .txt contract (used instead of the pasted text)",
                                 file_types=[".txt"], type="filepath", height=160, elem_id="upload")
                clause = gr.Dropdown(CHOICES, value="Governing Law", label="Clause type",
                                     info="'all': every CUAD clause type but Parties, one pass over the contract",
                                     elem_id="clause")
                find = gr.Button("Find the clause", variant="primary", elem_id="find")
            with gr.Column(scale=1):
                summary = gr.Textbox(label="Result (character offsets into the contract, or NONE)",
                                     interactive=False, elem_id="summary")
                shown = gr.HTML(label="The contract, the quote highlighted", elem_id="highlighted")
                table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, elem_id="table", wrap=True,
                                     column_widths=["24%", "10%", "9%", "9%", "48%"])
        find.click(on_find, inputs=[contract, upload, clause], outputs=[summary, shown, table])
    return app


# ---- the command -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog="python -m engine.demo", description=__doc__.split("\n\n")[0])
    ap.add_model_args(adapter_required=False)
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=7860, help="TCP port to serve on")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per window: prompt + answer")
    ap.add_argument("--max-new-tokens", type=int, default=384, help="answer budget per window")
    ap.add_argument("--decode", choices=DECODES, default=None,
                    help="constrained: the answer is a verbatim slice of the contract (or NONE), decided on the text; "
                         "rank: constrained, starting at the paragraph the model finds likeliest; channel: the whole "
                         "paragraph under which the clause name is likeliest, or NONE (default: channel for an "
                         "--adapter trained by engine.channel_train, else constrained; as engine.extract)")
    ap.add_argument("--channel-unit", choices=tuple(UNITS), default=None,
                    help="with --decode channel: quote whole paragraphs or sentences (default: the --unit an "
                         "engine.channel_train adapter was trained with, else paragraph)")
    ap.add_argument("--channel-rule", default=None, metavar="RULE_JSON",
                    help="with --decode channel: when to answer NONE (python -m engine.calibrate); default: NONE "
                         "when no paragraph beats an empty clause")
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    return ap


def run(args) -> None:
    for name in ("threads", "seq_len", "max_new_tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: use a TCP port in 1-65535")
    check_port(args.host, args.port)  # before minutes of model loading, in our words, not gradio's server_port
    _gradio()  # gradio missing: say so before minutes of model loading
    choose_decoding(args)  # as engine.extract: the decision an engine.channel_train adapter learned, with a note
    rule = read_rule(args.channel_rule, args.channel_unit, args.adapter, run_model_source(args.model, args.adapter)) \
        if args.channel_rule else None
    window_budget(None, "all", args.seq_len, answer_budget(args.decode, args.max_new_tokens))  # before the model
    set_threads(args.threads)
    model, tok, source = load_for_eval(args.model, args.adapter)
    reader = Reader(model, tok, args.seq_len, args.max_new_tokens, args.decode, args.channel_unit, rule)
    reader.budget("all")  # too short a --seq-len for the prompt fails here, not per query
    how = f"channel decoding of {args.channel_unit}s" if args.decode == "channel" else f"{args.decode} decoding"
    title = f"clauselora ({source}{' + ' + Path(args.adapter).name if args.adapter else ''}, {how})"
    print(f"demo: {title} on http://{args.host}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr, flush=True)
    build_app(reader, title).launch(server_name=args.host, server_port=args.port, ssr_mode=False, quiet=True)


def check_port(host: str, port: int) -> None:
    """ValueError naming --port (or --host) unless this process could serve on host:port now: bound as the web
    server binds (SO_REUSEADDR: a port a closed server left in TIME_WAIT is free), then let go."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host}: not an address to serve on ({e}); use 127.0.0.1, or 0.0.0.0 for every "
                         "interface") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            why = ("already in use (another demo or server?)" if e.errno == errno.EADDRINUSE else
                   f"cannot serve there ({e.strerror or e})")
            other = port + 1 if port < 65535 else 7860
            raise ValueError(f"--port {port} on {host}: {why}; pass another --port, e.g. --port {other}") from None


def main(argv=None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
