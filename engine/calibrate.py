"""Fit when the noisy-channel decoder answers NONE, on queries it is never tested on.

    python -m engine.evaluate --decode channel --data acord:DIR --split train --limit 300 --out runs/eval/calib
    python -m engine.calibrate --rows runs/eval/calib/eval.json --out runs/calib/channel_rule.json \\
        [--max-wrongly-none 10] [--features gain,gap,lead] [--check runs/eval/test_channel/eval.json]

`--decode channel` picks a paragraph well but cannot tell a context with the clause from one without it: the
best paragraph always explains the query somewhat. Each row of a channel eval.json carries what the decision can
see (model.channel.channel_features: the best paragraph's gain over an empty clause, its lead over the runner-up
and over the mean, per query token). This fits a logistic regression of "the context holds a clause" on those
features, then sets its threshold so that at most --max-wrongly-none % of the calibration rows that hold a clause
are answered NONE (the issue's bound), and writes the rule with its provenance.
`engine.evaluate --decode channel --channel-rule RULE` applies it.

--check re-decides the rows of another channel eval.json with the fitted rule from their stored scores (no model
is loaded: the decision reads only the features, and the best paragraph's offsets are stored even where the run
answered NONE; a --focus-adapter run's trims are replayed, and a row it answered NONE, which has none, is
quoted whole) and prints the headline that evaluate would. The rule records the model, adapter and
--channel-unit of its rows: evaluate, extract and demo refuse it for another unit (its feature scales are the
unit's) and warn for another adapter or model; --check refuses an eval.json of another unit. Calibrate on a
training or validation split; a rule fitted on the split it is checked on measures nothing. A rule is best fitted
on queries the adapter never trained on: train it with `--split fit` and calibrate on `--split calib`
(data.example.holdout); calibrate warns when the adapter's run (its config.json) trained on the rows' split, and
records what it trained on.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from data.example import NONE, splits_overlap
from data.validate import load_validated
from engine.cli import CliParser, run_command
from engine.evaluate import adapter_training, read_eval_json, trainings
from engine.report import headline, same_data
from engine.metrics import is_none, score, summarize
from model.channel import FEATURE_DECIMALS, FEATURES, ChannelRule
from model.files import atomic_write_text, make_dirs


def channel_rows(d: dict, path, redecided: bool = False) -> list[dict]:
    """The rows of a channel eval.json, each with its stored features (and, for rows to be redecided, the best
    span they would quote); a clear error for any other file."""
    if d.get("decode") != "channel":
        raise ValueError(f"{path}: decode is {d.get('decode')!r}; calibrate reads an eval.json written by "
                         "engine.evaluate --decode channel")
    rows = d.get("rows") or []
    missing = [r.get("id") if isinstance(r, dict) else r for r in rows if not _has_channel(r, redecided)]
    if not rows or missing:
        raise ValueError(f"{path}: {len(missing) or 'no'} rows without channel scores and features (first: "
                         f"{missing[:1]}); rerun engine.evaluate --decode channel with this version")
    return rows


def _has_channel(row, redecided: bool) -> bool:
    """Whether a row holds what fit_rule reads (the answer, the channel features) and, for redecide, the best
    span."""
    ch = row.get("channel") if isinstance(row, dict) else None
    return (isinstance(row.get("answer") if isinstance(row, dict) else None, str) and isinstance(ch, dict)
            and isinstance(ch.get("features"), dict) and (not redecided or "best" in ch))


def check_features(rows: list[dict], features, path) -> None:
    """Every row holds every feature the rule weighs, as a finite number; else a one-line error naming the file,
    the row and the feature (an eval.json of an older engine.evaluate, or one edited by hand: json reads NaN and
    Infinity, which would make the fitted bias NaN)."""
    for i, r in enumerate(rows):
        got = r["channel"]["features"]
        for f in features:
            if not isinstance(got.get(f), int | float) or isinstance(got.get(f), bool):
                raise ValueError(f"{path}: rows[{i}] (id {r.get('id')!r}) has no number for channel feature {f!r} "
                                 f"(it holds {', '.join(sorted(got)) or 'none'}); re-run engine.evaluate --decode "
                                 "channel with this version and pass its eval.json, or leave "
                                 f"{f} out of --features")
            if not math.isfinite(got[f]):
                raise ValueError(f"{path}: rows[{i}] (id {r.get('id')!r}) channel feature {f!r} is {got[f]}, not a "
                                 "finite number; re-run engine.evaluate --decode channel and pass its eval.json, "
                                 f"or leave {f} out of --features")


def unit_of(d: dict) -> str:
    """The --channel-unit a channel eval.json was decoded with (one written before the flag existed: paragraph,
    as engine.channel_train's hard_negatives reads it)."""
    return d.get("channel_unit") or "paragraph"


def design(rows: list[dict], features: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """X (n, k): each row's features; y (n,): 1 where the gold answer is a clause, 0 where it is NONE."""
    X = np.array([[r["channel"]["features"][f] for f in features] for r in rows], dtype=np.float64)
    y = np.array([0.0 if is_none(r["answer"]) else 1.0 for r in rows])
    return X, y


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> tuple[np.ndarray, float]:
    """Weights and bias of p(y=1 | x) = sigmoid(x.w + b) by Newton's method on the mean log-loss plus l2 |w|^2
    (the bias unpenalised); features are standardised inside and the result mapped back to raw units."""
    assert X.ndim == 2 and len(X) == len(y) and 0 < y.sum() < len(y), "need both classes"
    mu, sd = X.mean(0), X.std(0) + 1e-12
    Z = np.hstack([(X - mu) / sd, np.ones((len(X), 1))])
    theta = np.zeros(Z.shape[1])
    reg = np.full(Z.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(Z @ theta)))
        grad = Z.T @ (p - y) / len(y) + reg * theta
        H = (Z * (p * (1 - p))[:, None]).T @ Z / len(y) + np.diag(reg)
        step = np.linalg.solve(H, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    w = theta[:-1] / sd
    return w, float(theta[-1] - (w * mu).sum())


def fit_rule(rows: list[dict], features: tuple[str, ...], max_wrongly_none: float) -> tuple[ChannelRule, dict]:
    """The logistic direction, then the bias moved so that at most max_wrongly_none % of clause rows fall at or
    below 0 (answered NONE). Returns the rule and what it does on the calibration rows.
    The rows hold their features rounded (FEATURE_DECIMALS) while a decoder applies the rule to the unrounded
    ones, which can lie 0.5e-4 * sum|w| lower: the threshold stays that far below the lowest clause row kept, or
    a row reported kept here would be answered NONE at decode time."""
    X, y = design(rows, features)
    w, _ = fit_logistic(X, y)
    if not np.isfinite(w).all():
        raise ValueError(f"the fit on {features} did not converge (weights {w.tolist()}); leave out a feature "
                         "whose values are all alike, or calibrate on more rows")
    v = X @ w
    clause_v = np.sort(v[y == 1])
    k = int(np.floor(max_wrongly_none / 100 * len(clause_v)))  # clause rows allowed at or below the threshold
    # + 1% and 1e-9: the float error of summing the weighted features in another order (and a margin at w = 0)
    margin = 1.01 * 0.5 * 10.0 ** -FEATURE_DECIMALS * float(np.abs(w).sum()) + 1e-9
    # midway between the (k+1)-th lowest clause value and the row value below it (the k-th clause value, or for
    # k = 0 any row's), so that exactly k clause rows are answered NONE, unless that is within the margin
    lower = v[v < clause_v[0]]
    below = clause_v[k - 1] if k > 0 else lower.max() if lower.size else clause_v[0] - 2 * margin
    t = min((below + clause_v[k]) / 2, clause_v[k] - margin)
    rule = ChannelRule(weights={f: float(x) for f, x in zip(features, w)}, bias=float(-t))
    vals = X @ w - t
    fit = {"rows": int(len(y)), "clause_rows": int(y.sum()), "none_rows": int(len(y) - y.sum()),
           "wrongly_none": round(100 * float((vals[y == 1] <= 0).mean()), 2),
           "none_answered_none": round(100 * float((vals[y == 0] <= 0).mean()), 2)}
    return rule, fit


def redecide(d: dict, rows: list[dict], rule: ChannelRule, path, untrimmed: list | None = None) -> list[dict]:
    """The rows as evaluate would have written them under `rule`: NONE, or the stored best unit, rescored. A run
    with a --focus-adapter stored what its focus stage kept of each unit it quoted (channel "focus": the trim's
    offsets, or null for the unit whole): that is quoted again. A row that run answered NONE has no trim to
    replay (the focus stage never ran); quoted under `rule`, it is quoted whole, and its id goes to untrimmed
    when a list is given."""
    check_features(rows, tuple(rule.weights), path)
    examples, _ = load_validated(d["data"], d["split"], max_rejected=1.0)  # as evaluate kept them
    by_id = {ex.id: ex for ex in examples}
    focused = bool(d.get("focus_adapter"))
    out = []
    for r in rows:
        ex = by_id.get(r["id"])
        if ex is None:
            raise ValueError(f"{path}: row {r['id']!r} is not in {d['data']} split {d['split']}; was the data "
                             "changed since the run?")
        ch = r["channel"]
        if rule.value(ch["features"]) > 0:
            a, b = ch["focus"] if focused and ch.get("focus") is not None else ch["best"]
            if focused and "focus" not in ch and untrimmed is not None:
                untrimmed.append(r["id"])
            pred, start, end = ex.context[a:b], a, b
        else:
            pred, start, end = NONE, None, None
        out.append({**r, "prediction": pred, "start": start, "end": end,
                    "scores": score(pred, ex.answer, ex.context, start)})
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog="python -m engine.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", required=True, help="eval.json of engine.evaluate --decode channel on a train or "
                                                  "valid split")
    ap.add_argument("--out", required=True, help="where to write the rule (JSON)")
    ap.add_argument("--features", default=",".join(FEATURES), help="comma-separated features the rule weighs")
    ap.add_argument("--max-wrongly-none", type=float, default=10.0,
                    help="percent of clause rows the rule may answer NONE on the calibration rows")
    ap.add_argument("--check", default=None, metavar="EVAL_JSON",
                    help="another channel eval.json (e.g. the test split): print its headline under the rule")
    return ap


def run(args) -> dict:
    features = tuple(f.strip() for f in args.features.split(",") if f.strip())
    bad = [f for f in features if f not in FEATURES]
    if not features or bad:
        raise ValueError(f"--features: unknown {bad or 'none given'}; choose from {', '.join(FEATURES)}")
    if not 0 <= args.max_wrongly_none < 100:
        raise ValueError(f"--max-wrongly-none must be a percent in [0, 100), got {args.max_wrongly_none}")
    d = read_eval_json(args.rows, "calibration")
    rows = channel_rows(d, args.rows)
    check_features(rows, features, args.rows)
    if d.get("split") == "test":
        print(f"warning: {args.rows} is a test split; a rule fitted on test data cannot be evaluated on it",
              file=sys.stderr)
    trained = adapter_training(d.get("adapter"))
    for t in trainings(trained):
        if same_data(t["data"], d.get("data")) and splits_overlap(t["split"], d.get("split")):
            print(f"warning: the adapter trained on split {t['split']!r} ({t['config']}), which holds the "
                  f"{d.get('split')!r} rows of {args.rows}: a rule fitted on rows the model has seen is set too "
                  "confidently; train with --split fit and calibrate on --split calib", file=sys.stderr)
            break
    n_none = sum(is_none(r["answer"]) for r in rows)
    if n_none == 0 or n_none == len(rows):
        raise ValueError(f"{args.rows}: rows of one kind only ({n_none} NONE of {len(rows)}); calibration needs "
                         "contexts with and without a clause")
    rule, fit = fit_rule(rows, features, args.max_wrongly_none)
    doc = {**rule.to_dict(), "features": list(features), "max_wrongly_none": args.max_wrongly_none,
           "calibration": {"eval_json": str(args.rows), "data": d.get("data"), "split": d.get("split"),
                           "model": d.get("model"), "adapter": d.get("adapter"), "channel_unit": unit_of(d),
                           "adapter_trained_on": trained, **fit},
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    result, untrimmed = None, []
    if args.check:  # read and re-decided before the rule is written: a check that fails leaves no rule behind
        c = read_eval_json(args.check, "--check")
        if unit_of(c) != unit_of(d):
            raise ValueError(f"{args.check}: decoded with --channel-unit {unit_of(c)} and the calibration rows "
                             f"{args.rows} with {unit_of(d)}; a rule's feature scales are its unit's: check on an "
                             f"eval.json of --channel-unit {unit_of(d)}")
        if same_data(c.get("data"), d.get("data")) and splits_overlap(c.get("split"), d.get("split")):
            print(f"warning: {args.check} (split {c.get('split')!r}) shares rows with the calibration rows (split "
                  f"{d.get('split')!r}): the check measures the fit, not the rule", file=sys.stderr)
        checked = redecide(c, channel_rows(c, args.check, redecided=True), rule, args.check, untrimmed)
        result = {**summarize(checked), "decode": "channel"}
        doc["check"] = {"eval_json": str(args.check), "clause": result["clause"], "none": result["none"],
                        "untrimmed": len(untrimmed)}  # in RULE.json too: what the rule did on held-out rows
    make_dirs(Path(args.out).parent)  # runs/calib/ need not exist yet
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(f"rule: NONE unless {rule.bias:+.3f} " + " ".join(f"{w:+.3f}*{f}" for f, w in rule.weights.items())
          + " > 0")
    print(f"on the calibration rows ({fit['rows']}: {fit['clause_rows']} clause, {fit['none_rows']} NONE): "
          f"wrongly NONE {fit['wrongly_none']}%, NONE answered NONE {fit['none_answered_none']}%")
    print(f"wrote {args.out}")
    if result is not None:
        if c.get("focus_adapter"):
            print(f"{args.check} was read with --focus-adapter {c['focus_adapter']}: its quotes are replayed as that "
                  f"run trimmed them; {len(untrimmed)} row(s) it answered NONE and the rule quotes have no focus "
                  f"trim to replay and are scored with the whole {unit_of(c)}"
                  + (f" (first: {untrimmed[0]!r})" if untrimmed else ""))
        print(f"{args.check} under the rule:\n{headline(result)}")
    return doc


def main(argv=None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
