"""The human side of an evaluation: report.md with tables, and PNG plots when matplotlib is installed.

Plots (optional extra `plot`): the similarity histogram of clause examples with the 70 ("good") and 90 ("excellent")
lines (bins hold their upper edge: an exact 90 is not "> 90"), per category the clause examples' average similarity
and the NONE examples' share answered NONE, and the training loss curve from a run's metrics.jsonl. Without
matplotlib the report is tables only and says so. Every file is written to a temporary name and renamed, so a
crash never leaves half a file.

Also the parameter summary training prints at setup (lora_report): trainable / frozen / quantized counts and bytes.

As a command, for runs already made (no model is loaded):
    python -m engine.report runs/eval/after/eval.json --compare runs/eval/before/eval.json [--out DIR]
prints the headline (clause and NONE examples apart) and, with --compare, the before / after table; --out writes
report.md and the plots again into DIR.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.metrics import AGGREGATE_KEYS, KINDS, by_kind, is_none, normalize_ws
from model.files import atomic_file, atomic_write_text
from model.llama import Llama
from model.lora import lora_layers
from model.quant import Linear4bit

PLOTS_SKIPPED = "_Plots skipped: matplotlib is not installed (pip install -e '.[plot]')._"

LABELS = {
    "n": "examples",
    "avg_similarity": "avg similarity (0-100)",
    "excellent": "excellent (sim > 90) %",
    "good": "good (sim > 70) %",
    "exact_match": "exact match %",
    "f1": "token F1 %",
    "right_start": "right clause start %",
    "predicted_none": "answered NONE %",
    "verbatim": "verbatim quotes %",
    "abstention_precision": "NONE precision %",
    "abstention_recall": "NONE recall %",
}
# Abstention precision and recall count both kinds (tp and fn on NONE examples, fp on clause examples): within one
# kind they mean nothing (0 or undefined on clause examples, 100 on NONE examples), so only "all" rows show them.
ALL_ONLY = ("abstention_precision", "abstention_recall")
# What a per-category or per-source table shows of each kind: a NONE example has one right answer, so its figure is
# the share answered NONE.
KIND_KEYS = {"clause": tuple(k for k in AGGREGATE_KEYS if k not in ALL_ONLY), "none": ("n", "predicted_none")}
KIND_TITLES = {"clause": "Clause examples", "none": "NONE examples"}


def fmt(value, key: str = "") -> str:
    if value is None:
        return "-"
    if key == "n":
        return str(int(value))
    return f"{value:.1f}"


def same_data(a: str | None, b: str | None) -> bool:
    """Whether two data specs name the same source (kind and resolved path)."""
    if not a or not b:
        return False
    (ka, _, pa), (kb, _, pb) = a.partition(":"), b.partition(":")
    return ka == kb and (pa == pb or (bool(pa) and bool(pb) and Path(pa).resolve() == Path(pb).resolve()))


def same_examples_note(before: dict, after: dict[str, str], data=None, split=None) -> str | None:
    """None when the baseline's rows are the same examples as `after` ({id: gold answer}; ids in any order) with
    the same gold answers, of the same data (same_data: two spellings of one path are one) and split (where both
    name them); else a line saying what differs: a change column over different examples compares nothing."""
    fix = "(pass the same --data, --split and --limit to both)"
    if data is not None and before.get("data") is not None and not same_data(before["data"], data):
        return f"the baseline ran on data {before['data']!r} and this run on {data!r}: the change column compares " \
               f"different examples {fix}"
    if split is not None and before.get("split") not in (None, split):
        return f"the baseline ran on split {before['split']!r} and this run on {split!r}: the change column " \
               f"compares different examples {fix}"
    rows = [r for r in before.get("rows", []) if isinstance(r, dict)]
    b, a = [str(r.get("id")) for r in rows], [str(i) for i in after]
    if sorted(b) != sorted(a):
        return (f"the baseline scored {len(b)} examples and this run {len(a)}, {len(set(a) & set(b))} of them the "
                f"same: the change column compares different examples {fix}")
    mine = {str(i): normalize_ws(ans) for i, ans in after.items()}
    moved = [str(r.get("id")) for r in rows if normalize_ws(r.get("answer")) != mine[str(r.get("id"))]]
    if moved:
        return (f"{len(moved)} of the {len(a)} examples have another gold answer in the baseline (first: "
                f"{moved[0]!r}): the data changed between the runs; evaluate both on the data as it is now")
    return None


def setting_notes(before: dict, after: dict) -> list[str]:
    """Lines for the reading budgets where the baseline's differ from `after`'s (run facts as eval.json names
    them; a key after lacks is not compared): --seq-len (the windows a context is read in) and --max-new-tokens
    (an answer cut short scores low for that alone; channel decoding without a --focus-adapter generates nothing,
    so there it is not compared)."""
    notes = []
    if after.get("seq_len") is not None and before.get("seq_len") not in (None, after["seq_len"]):
        notes.append(f"the baseline read windows of {before['seq_len']} tokens, this run {after['seq_len']}: pass "
                     "the same --seq-len to both for a like-for-like comparison")
    generates = [d.get("decode") != "channel" or bool(d.get("focus_adapter")) for d in (before, after)]
    if after.get("max_new_tokens") is not None and before.get("max_new_tokens") not in (None, after["max_new_tokens"]) \
            and any(generates):
        notes.append(f"the baseline's answers had --max-new-tokens {before['max_new_tokens']}, this run's "
                     f"{after['max_new_tokens']}: an answer cut short scores low for that alone; pass the same "
                     "--max-new-tokens to both")
    return notes


def decoding_note(before: dict, decode: str | None, unit: str | None) -> str | None:
    """A line when the baseline decoded otherwise than this run (--decode, and --channel-unit for channel): the
    change column then includes the decoder's own difference (engine.evaluate picks channel decoding by itself for
    an engine.channel_train adapter)."""
    def said(d, u):
        return f"--decode {d}" + (f" --channel-unit {u}" if d == "channel" and u else "")
    mine, theirs = said(decode, unit), said(before.get("decode"), before.get("channel_unit"))
    if before.get("decode") is None or mine == theirs:
        return None
    return f"the baseline decoded with {theirs}, this run with {mine}: the change column includes the decoder's"


def compare_table(before: dict, after: dict) -> str:
    """Markdown table `examples | metric | before | after | change` of two eval.json dicts: clause examples and
    NONE examples apart (KINDS), then all together; an aggregate dict alone counts as "all". NONE precision and
    recall only in the "all" rows (ALL_ONLY)."""
    lines = ["| examples | metric | before | after | change |", "|---|---|---:|---:|---:|"]
    for group in (*KINDS, "overall"):
        if group != "overall" and (group not in before or group not in after):
            continue
        lines += _compare_rows(before.get(group, before), after.get(group, after),
                               "all" if group == "overall" else group)
    return "\n".join(lines) + "\n"


def _compare_rows(b: dict, a: dict, label: str) -> list[str]:
    lines = []
    for k in AGGREGATE_KEYS:
        if k in ALL_ONLY and label != "all":
            continue
        x, y = b.get(k), a.get(k)
        if k == "n":
            change = ""
        elif x is None or y is None:
            change = "-"
        else:
            change = f"{y - x:+.1f}"
        lines.append(f"| {label} | {LABELS[k]} | {fmt(x, k)} | {fmt(y, k)} | {change} |")
    return lines


def aggregate_table(groups: dict[str, dict], first: str, keys=AGGREGATE_KEYS) -> str:
    """One row per group, one column per key; a row named "clause" or "none" (a kind) leaves ALL_ONLY blank."""
    head = f"| {first} | " + " | ".join(LABELS[k] for k in keys) + " |"
    rule = "|---|" + "---:|" * len(keys)
    rows = [f"| {name} | " + " | ".join("" if k in ALL_ONLY and name in KINDS else fmt(agg.get(k), k) for k in keys)
            + " |" for name, agg in groups.items()]
    return "\n".join([head, rule, *rows]) + "\n"


def kind_tables(groups: dict[str, dict[str, dict]], first: str) -> list[str]:
    """report.md lines for by_kind's groups: a table of clause examples (KIND_KEYS["clause"]) and one of NONE
    examples (their share answered NONE), each where that kind has examples."""
    md = []
    for k in KINDS:
        if groups.get(k):
            md += [f"{KIND_TITLES[k]}:", "", aggregate_table(groups[k], first, KIND_KEYS[k])]
    return md or ["_(no examples)_", ""]


def read_metrics_jsonl(path: Path) -> list[dict]:
    """Training log rows (one JSON object per line); a torn last line from a live run is skipped."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: metrics.jsonl does not read ({e}); pass a training run's OUT/metrics.jsonl") \
            from None
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) and not text.endswith("\n"):
                continue  # the line a live run is writing
            raise ValueError(f"{path}:{i}: not a JSON line; pass a training run's OUT/metrics.jsonl") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: not a JSON object; pass a training run's OUT/metrics.jsonl")
        rows.append(row)
    return rows


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _save(fig, plt, path: Path) -> None:
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")  # the temporary's name ends in .tmp
    finally:
        plt.close(fig)


def clause_similarities(result: dict) -> list[float]:
    """Similarity of every clause example (gold answer not NONE) in an eval.json dict."""
    return [r["scores"]["similarity"] for r in result.get("rows", []) if not is_none(r["answer"])]


def bin_counts(xs: list[float], step: int) -> list[int]:
    """Counts of xs in right-closed bins of width step: [0, step], (step, 2 step], ..., (100 - step, 100]. A bin
    holds its upper edge, so a similarity of exactly 90 is below the 90 line, as "excellent" (> 90) counts it."""
    assert 100 % step == 0, step
    edges = range(step, 100, step)
    c = [0] * (100 // step)
    for x in xs:
        c[sum(x > e for e in edges)] += 1
    return c


def bin_label(i: int, step: int) -> str:
    """Bin i of bin_counts as an interval: "[0,10]" for the first (it holds 0), "(90,100]" for the others."""
    return f"{'[' if i == 0 else '('}{i * step},{(i + 1) * step}]"


def text_histogram(sims: list[float], before: list[float] | None = None, step: int = 10, width: int = 24) -> str:
    """The similarity histogram in plain text, for a terminal or a README: one line per `step`-wide bin that holds
    anything (bin_counts' right-closed bins, labelled as intervals; empty bins left out), a bar of full blocks
    scaled to the largest count, and the count; the baseline's column beside it when given."""
    cols = [("before", bin_counts(before, step)), ("after", bin_counts(sims, step))] if before is not None \
        else [("clause", bin_counts(sims, step))]
    top = max(max(c) for _, c in cols) or 1
    bar = lambda n: ("█" * round(width * n / top) or ("▏" if n else "")) + f" {n}"  # noqa: E731
    lines = ["similarity  " + "".join(f"{name:<{width + 6}}" for name, _ in cols).rstrip()]
    for i in range(100 // step):
        if any(c[i] for _, c in cols):
            lines.append(f"{bin_label(i, step):>10}  " + "".join(f"{bar(c[i]):<{width + 6}}" for _, c in cols).rstrip())
    return "\n".join(lines) + "\n"


def plot_similarity_hist(plt, sims: list[float], path: Path, before: list[float] | None = None, step: int = 5) -> None:
    """Similarity of the clause examples (NONE examples are reported apart), with the baseline's beside it; bins as
    bin_counts' (right-closed: a bar just left of the 90 line holds an exact 90, which is not > 90)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lefts = list(range(0, 100, step))
    if before:
        ax.bar(lefts, bin_counts(before, step), width=step, align="edge", color="#c44e52", alpha=0.45,
               edgecolor="white", label=f"before (n={len(before)})")
    ax.bar(lefts, bin_counts(sims, step), width=step, align="edge", color="#4c72b0", alpha=0.75 if before else 1.0,
           edgecolor="white", label=f"{'after' if before else 'this run'} (n={len(sims)})")
    for x, label, color in ((70, "good > 70", "#dd8452"), (90, "excellent > 90", "#55a868")):
        ax.axvline(x, color=color, linestyle="--", label=label)
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"similarity to the reference clause (rapidfuzz ratio, 0-100; bins (a, a+{step}])")
    ax.set_ylabel("clause examples")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Similarity on clause examples")
    ax.legend(loc="upper center", fontsize=8)
    _save(fig, plt, path)


# what each kind's panel of categories.png draws: (aggregate key, axis label)
CATEGORY_PANELS = {"clause": ("avg_similarity", "clause examples: average similarity"),
                   "none": ("predicted_none", "NONE examples: answered NONE %")}


def plot_categories(plt, groups: dict[str, dict[str, dict]], path: Path, before: dict | None = None) -> None:
    """Per category, clause examples and NONE examples apart (by_kind's groups): clause examples' average
    similarity, NONE examples' share answered NONE, a panel each; with a baseline, its bars beside this run's."""
    panels = [k for k in KINDS if groups.get(k)]
    rows = max(len(groups[k]) for k in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), max(2.5, (0.42 if before else 0.28) * rows + 1)),
                             squeeze=False)
    h = 0.4 if before else 0.8
    for ax, k in zip(axes[0], panels):
        key, xlabel = CATEGORY_PANELS[k]
        items = sorted(((c, a) for c, a in groups[k].items() if a.get(key) is not None), key=lambda ca: ca[1][key])
        ys = list(range(len(items)))
        if before:
            ax.barh([y - h / 2 for y in ys], [((before.get(k) or {}).get(c) or {}).get(key) or 0 for c, _ in items],
                    height=h, color="#c44e52", alpha=0.6, label="before")
        ax.barh([y + (h / 2 if before else 0) for y in ys], [a[key] for _, a in items], height=h, color="#4c72b0",
                label="after" if before else None)
        ax.set_yticks(ys, [f"{c[:40]} (n={a['n']})" for c, a in items])
        for x in ((70, 90) if k == "clause" else ()):
            ax.axvline(x, color="grey", linestyle=":")
        ax.set_xlim(0, 100)
        ax.set_xlabel(xlabel)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"{KIND_TITLES[k]} per category")
        if before:
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()  # else the second panel's category names run over the first panel
    _save(fig, plt, path)


def plot_loss(plt, rows: list[dict], path: Path) -> bool:
    """Training loss, the validation loss on the same axis, and the task metric (clause similarity) beside."""
    train = [(r["step"], r["loss"]) for r in rows if "step" in r and r.get("loss") is not None]
    val = [(r["step"], r["eval_loss"]) for r in rows if "step" in r and r.get("eval_loss") is not None]
    sim_key = "eval_clause_avg_similarity" if any("eval_clause_avg_similarity" in r for r in rows) \
        else "eval_avg_similarity"
    evals = [(r["step"], r[sim_key]) for r in rows if "step" in r and r.get(sim_key) is not None]
    if not train:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), color="#4c72b0", label="train loss")
    if val:
        ax.plot(*zip(*val), color="#c44e52", marker="s", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if evals:  # loss alone does not predict extraction quality; show the task metric beside it
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), color="#55a868", marker="o",
                 label="eval clause similarity" if "clause" in sim_key else "eval avg similarity")
        ax2.set_ylabel("eval similarity")
        ax2.set_ylim(0, 100)
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Training")
    _save(fig, plt, path)
    return True


def write_report(result: dict, out_dir: Path, metrics_jsonl: Path | None = None,
                 baseline: dict | None = None) -> Path:
    """Write out_dir/report.md (+ PNGs when matplotlib is importable) for an eval.json dict; returns the md path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    images: list[tuple[str, str]] = []
    rows = result.get("rows", [])
    # per category and per source from the rows (what summarize stores in eval.json), so that a baseline written
    # before the two kinds were split there reads the same
    categories = by_kind(rows, "category")
    if plt is not None:
        clause_sims = clause_similarities
        if clause_sims(result):
            plot_similarity_hist(plt, clause_sims(result), out_dir / "similarity_hist.png",
                                 before=clause_sims(baseline) if baseline else None)
            images.append(("Similarity on clause examples" + (", before and after" if baseline else ""),
                           "similarity_hist.png"))
        if any(categories.values()):
            plot_categories(plt, categories, out_dir / "categories.png",
                            before=by_kind(baseline.get("rows", []), "category") if baseline else None)
            images.append(("Per category: clause examples' average similarity, NONE examples answered NONE",
                           "categories.png"))
        if metrics_jsonl is not None and plot_loss(plt, read_metrics_jsonl(metrics_jsonl), out_dir / "loss.png"):
            images.append(("Training and validation loss", "loss.png"))

    md = ["# Evaluation report", ""]
    for key in ("model", "adapter", "data", "split", "limit", "decode", "seq_len", "max_new_tokens", "seconds",
                "created"):
        if result.get(key) is not None:
            md.append(f"- **{key}**: {result[key]}")
    if result.get("quantize") is not None:
        md.append("- **base weights**: " + ("NF4 (4-bit, as QLoRA trains)" if result["quantize"] == "nf4"
                                            else "full precision (the checkpoint's weights, dequantized to fp32/bf16)")
                  + (f", answering in {result['dtype']}" if result.get("dtype") else ""))
    for note in result.get("not_held_out") or []:  # engine.evaluate's: an adapter trained on these examples
        md.append(f"- **not held out**: {note}")
    if result.get("truncated"):  # engine.evaluate counts them; an answer cut short scores low for that alone
        md.append(f"- **{result['truncated']} answers cut at --max-new-tokens** (no stop token within "
                  f"{result.get('max_new_tokens', '?')} tokens; their rows say `\"truncated\": true`)")
    md += ["", "Similarity is `rapidfuzz.fuzz.ratio` (0-100) on whitespace-normalised text; exact match is on the "
           "same normalised text; F1 is SQuAD token F1; a right clause start is a quote that begins where the gold "
           "clause begins, or before it by a list number only (`2. `, `(a) `); NONE precision/recall treat the "
           "abstention answer `NONE` as the positive class and count both kinds of example, so only the `all` row "
           "shows them (- = undefined, nothing to count).", "", "## Overall", "",
           "Clause examples (the gold answer is a clause) and NONE examples (the gold answer is NONE) are "
           "reported apart: on clause examples `answered NONE` is a miss, on NONE examples it is the right answer.",
           "", aggregate_table({**{k: result[k] for k in KINDS if k in result}, "all": result["overall"]}, "")]
    if baseline is not None:
        notes = [n for n in (same_examples_note(baseline, {r.get("id"): r.get("answer") for r in rows},
                                                result.get("data"), result.get("split")),
                             decoding_note(baseline, result.get("decode"), result.get("channel_unit")),
                             *setting_notes(baseline, result)) if n]
        md += ["## Before / after", "", f"Baseline: {baseline.get('model', '?')}"
               f"{' + ' + str(baseline['adapter']) if baseline.get('adapter') else ''}", "",
               *[line for n in notes for line in (f"**Not like for like**: {n}.", "")],
               compare_table(baseline, result), "Similarity on clause examples, before and after:", "",
               "```", text_histogram(clause_similarities(result), clause_similarities(baseline)) + "```", ""]
    if images:
        md += ["## Plots", ""] + [f"![{title}]({name})\n" for title, name in images]
    elif plt is None:
        md += [PLOTS_SKIPPED, ""]
    md += ["## By category", "", *kind_tables(categories, "category"),
           "## By source", "", *kind_tables(by_kind(rows, "source"), "source")]
    worst = sorted((r for r in rows if r["scores"]["similarity"] < 100), key=lambda r: r["scores"]["similarity"])[:5]
    if worst:
        md += ["## Lowest-similarity examples", ""]
        for r in worst:
            md += [f"- `{r['id']}` ({r['category']}), similarity {r['scores']['similarity']:.1f}",
                   f"  - answer: {_short(r['answer'])}", f"  - prediction: {_short(r['prediction'])}"]
        md.append("")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path


def _short(text: str, n: int = 200) -> str:
    text = " ".join((text or "").split())
    return ("`" + (text[:n] + " ..." if len(text) > n else text).replace("`", "'") + "`") if text else "_(empty)_"


# ---- the parameter summary training prints ------------------------------------------------------------------
def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def lora_report(model: Llama) -> str:
    """Trainable / frozen / quantized parameter counts and bytes. Counts come from requires_grad and module
    types, not from model.training, so a model in eval() still reports its adapters."""
    trainable = frozen = trainable_bytes = frozen_bytes = 0
    for p in model.parameters():  # tied weights are yielded once
        if p.requires_grad:
            trainable, trainable_bytes = trainable + p.numel(), trainable_bytes + p.numel() * p.element_size()
        else:
            frozen, frozen_bytes = frozen + p.numel(), frozen_bytes + p.numel() * p.element_size()
    q_layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    q_weights = sum(m.in_features * m.out_features for m in q_layers)
    q_packed = sum(m.weight.numel() for m in q_layers)
    q_held = sum(m.nbytes() for m in q_layers)
    total = trainable + frozen + q_weights
    cfg = model.lora_config
    lines = []
    if cfg:
        lines.append(f"LoRA r={cfg['r']} alpha={cfg['lora_alpha']} rslora={cfg['use_rslora']} on "
                     f"{len(lora_layers(model))} layers ({', '.join(cfg['target_modules'])})")
    lines.append(f"trainable  {trainable:>13,} params  {_fmt_bytes(trainable_bytes):>12}  "
                 f"({100 * trainable / max(total, 1):.3f}% of {total:,})")
    lines.append(f"frozen     {frozen:>13,} params  {_fmt_bytes(frozen_bytes):>12}  (high precision: "
                 "embeddings, norms, lm_head, unquantized linears)")
    if q_layers:
        fp16 = 2 * q_weights
        lines.append(f"quantized  {q_weights:>13,} weights {_fmt_bytes(q_held):>12}  in {len(q_layers)} NF4 layers "
                     f"(packed {_fmt_bytes(q_packed)} + state {_fmt_bytes(q_held - q_packed)}); "
                     f"fp16 would be {_fmt_bytes(fp16)}, ratio {q_held / fp16:.3f}")
    return "\n".join(lines)


def headline(result: dict, seconds: float | None = None) -> str:
    """Two lines, clause examples and NONE examples apart (a NONE-only model must not look good)."""
    c, n = result["clause"], result["none"]
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    took = f" in {seconds:.0f}s" if seconds is not None else ""
    return (f"{result['overall']['n']} examples{took} ({result.get('decode', 'constrained')} decoding)\n"
            f"  clause examples ({c['n']}): avg similarity {f(c['avg_similarity'])}, >90 {f(c['excellent'])}%, "
            f">70 {f(c['good'])}%, exact match {f(c['exact_match'])}%, F1 {f(c['f1'])}%, right start "
            f"{f(c['right_start'])}%, "
            f"wrongly NONE {f(c['predicted_none'])}%, verbatim {f(c['verbatim'])}%\n"
            f"  NONE examples ({n['n']}): answered NONE {f(n['predicted_none'])}% | NONE precision "
            f"{f(result['overall']['abstention_precision'])}%, recall {f(result['overall']['abstention_recall'])}%")


def print_results(result: dict, baseline: dict | None) -> None:
    """The lines engine.evaluate prints at its end: the headline, then (with a baseline) the before / after table
    and the similarity histogram of clause examples."""
    print(headline(result, result.get("seconds")))
    if baseline is not None:
        print(compare_table(baseline, result), end="")
        if result["clause"]["n"]:
            print(f"\nsimilarity on clause examples, before and after ({result['clause']['n']} clause examples; "
                  "empty bins left out)\n" + text_histogram(clause_similarities(result), clause_similarities(baseline)),
                  end="")


def _command(args) -> None:
    from engine.evaluate import read_baseline  # engine.evaluate imports this module
    from model.files import staged_files

    if args.metrics and not args.out:
        raise ValueError("--metrics adds the loss curve to report.md: pass --out DIR as well")
    runs = [read_baseline(p, role) for p, role in ((args.eval_json, "run"), (args.compare, "baseline")) if p]
    for path, d in zip((args.eval_json, args.compare), runs):
        for kind in (*KINDS, "overall"):
            agg = d.get(kind)
            if not (isinstance(agg, dict) and all(k in agg for k in AGGREGATE_KEYS)):
                raise ValueError(f"{path}: no complete {kind!r} aggregates; pass an eval.json written by "
                                 "engine.evaluate")
    result, baseline = runs[0], (runs[1] if args.compare else None)
    if args.metrics and not Path(args.metrics).is_file():
        raise FileNotFoundError(f"{args.metrics}: --metrics file not found (a training run's metrics.jsonl)")
    if args.metrics:
        read_metrics_jsonl(args.metrics)  # before anything is written: a file that does not read is one line
    if baseline is not None:
        answers = {r.get("id"): r.get("answer") for r in result.get("rows", [])}
        if note := same_examples_note(baseline, answers, result.get("data"), result.get("split")):
            print(f"note: {note}", file=sys.stderr)
        if note := decoding_note(baseline, result.get("decode"), result.get("channel_unit")):
            print(f"note: {note}", file=sys.stderr)
        for note in setting_notes(baseline, result):
            print(f"note: {note}", file=sys.stderr)
    if args.out:
        with staged_files(args.out) as tmp:
            write_report(result, tmp, metrics_jsonl=Path(args.metrics) if args.metrics else None, baseline=baseline)
        if _pyplot() is None:
            print("note: report.md has tables only: matplotlib is not installed (pip install -e '.[plot]')",
                  file=sys.stderr)
    print_results(result, baseline)
    if args.out:
        print(f"wrote {Path(args.out) / 'report.md'}")


def main(argv=None) -> int:
    from data.cli import CliParser, run_command

    ap = CliParser(prog="python -m engine.report", description="Results of engine.evaluate runs already made: "
                   "the headline (clause and NONE examples apart), a before / after table, report.md again.")
    ap.add_argument("eval_json", help="an eval.json written by engine.evaluate")
    ap.add_argument("--compare", metavar="BASELINE_EVAL_JSON", help="eval.json of a baseline run: prints metric | "
                    "before | after | change, and says so when the two runs scored different examples")
    ap.add_argument("--metrics", default=None, help="a training run's metrics.jsonl: report.md gains the loss curve")
    ap.add_argument("--out", default=None, help="write report.md (+ PNGs with matplotlib) into this directory; "
                    "default: print only")
    return run_command(_command, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
