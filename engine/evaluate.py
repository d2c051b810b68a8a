"""Measure the task itself: greedy extraction over a split, scored against the lawyers' clauses.

    python -m engine.evaluate --model SRC [--adapter DIR] --data SPEC [--split test] [--limit N] --out DIR

Writes OUT/eval.json (run facts, aggregates overall / per category / per source, one row per example) and
OUT/report.md (+ PNG plots when matplotlib is installed). `--compare BEFORE/eval.json` prints the
metric | before | after | change table. Loss does not predict extraction quality; this does.

For the trainer: `eval_subset(examples, n)` picks a fixed, category-balanced subset once, and
`evaluate_for_training(model, tok, subset, ...)` returns flat `eval_*` numbers for metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine.cli import CliParser, run_command
from engine.metrics import score, summarize
from engine.report import atomic_write_text, compare_table, write_report

METRIC_NOTES = {
    "similarity": "rapidfuzz.fuzz.ratio (0-100) on whitespace-normalised text (case-sensitive)",
    "exact_match": "whitespace-normalised strings identical (percent of examples)",
    "f1": "SQuAD v1.1 token F1 (lowercase, no punctuation/articles), percent",
    "excellent": "percent of examples with similarity > 90",
    "good": "percent of examples with similarity > 70",
    "abstention": "NONE is the positive class: precision tp/(tp+fp), recall tp/(tp+fn), percent; null = undefined",
}


# ---- choosing examples -------------------------------------------------------------------------------------
def eval_subset(examples: list, n: int | None, salt: str = "eval") -> list:
    """A deterministic subset of n examples, round-robin over categories so a small n still covers many.

    Within a category the order is a stable hash of the id (the same on every machine and run), and the
    categories take turns in a hashed order, so n smaller than the number of categories is not "the
    alphabetically first ones". The result keeps the input order. n None or >= len -> everything.
    """
    from data.example import stable_hash

    if n is None or n >= len(examples):
        return list(examples)
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.category, []).append(i)
    for idx in groups.values():
        idx.sort(key=lambda i: stable_hash(salt, examples[i].id))
    order = sorted(groups, key=lambda c: stable_hash(salt, "category", c))
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for c in order:
            if depth < len(groups[c]):
                picked.append(groups[c][depth])
                if len(picked) == n:
                    break
        depth += 1
    return [examples[i] for i in sorted(picked)]


def fit_prompt(tok, ex, seq_len: int):
    """(user message, its token count incl. chat template, truncated?) for ex, as training would cut it.

    data.batch.encode_example gives the prompt seq_len minus the answer's tokens and cuts the *context* to a
    window centred on the answer (the beginning of the contract for NONE), at word boundaries, shrinking until
    the re-rendered prompt fits. Doing the same here means evaluation shows the model the very window it was
    trained on; the answer's length (never its text) sets the budget. Examples must be validated (answer
    verbatim in context). Generation gets its own budget (max_new_tokens) on top.
    """
    from data.batch import cut_context
    from data.example import render_prompt

    prompt_budget = seq_len - len(tok.encode(tok.chat_answer(ex.answer)))
    prompt = render_prompt(ex)
    n = len(tok.encode(tok.chat_prompt(prompt)))
    if n <= prompt_budget:
        return prompt, n, False
    overhead = len(tok.encode(tok.chat_prompt(render_prompt(replace(ex, context="")))))
    max_chars = int((prompt_budget - overhead) * len(ex.context) / max(1, n - overhead))
    for _ in range(12):  # usually 1-2 rounds, as in data.batch.encode_example
        prompt = render_prompt(replace(ex, context=cut_context(ex.context, ex.answer, max(1, max_chars))))
        n = len(tok.encode(tok.chat_prompt(prompt)))
        if n <= prompt_budget:
            break
        max_chars = int(max_chars * min(0.98, prompt_budget / n))
    return prompt, n, True


# ---- running the model -------------------------------------------------------------------------------------
class Progress:
    """One status line: done/total, examples/s, ETA. Rewritten in place on a terminal, a line per update otherwise."""

    def __init__(self, total: int, label: str = "eval", stream=sys.stderr, enabled: bool = True):
        self.total, self.label, self.stream, self.enabled = total, label, stream, enabled
        self.t0 = time.perf_counter()
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 else 0.0
        eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "?"
        line = f"{self.label} {done}/{self.total} examples | {rate:.2f} ex/s | {dt:.0f}s elapsed | ETA {eta}"
        end = "" if self.tty and done < self.total else "\n"
        print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


def evaluate_examples(model, tok, examples: list, *, max_new_tokens: int = 256, batch_size: int = 8,
                      seq_len: int = 2048, progress: bool = False) -> dict:
    """Generate greedily for every example and score it -> {"overall", "by_category", "by_source", "rows"}.

    seq_len is the training row budget (prompt + answer, see fit_prompt); generation may add max_new_tokens.
    The model is put in eval mode for the call and restored after (the trainer calls this mid-run).
    """
    from model.generate import generate

    fitted = [fit_prompt(tok, ex, seq_len) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: -fitted[i][1])  # similar lengths share a batch
    predictions = [""] * len(examples)
    bar = Progress(len(examples), enabled=progress)
    bar.update(0)  # the first batch holds the longest prompts: say something before it starts
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                chunk = order[s:s + batch_size]
                outs = generate(model, tok, [fitted[i][0] for i in chunk], max_new_tokens=max_new_tokens,
                                temperature=0.0, batch_size=batch_size)
                for i, text in zip(chunk, outs):
                    predictions[i] = text
                bar.update(min(s + batch_size, len(order)))
    finally:
        model.train(was_training)
    rows = []
    for ex, (_, n_tok, cut), pred in zip(examples, fitted, predictions):
        rows.append({"id": ex.id, "category": ex.category, "source": ex.source, "query": ex.query,
                     "prediction": pred, "answer": ex.answer, "prompt_tokens": n_tok, "truncated": cut,
                     "scores": score(pred, ex.answer)})
    return {**summarize(rows), "rows": rows}


def evaluate_for_training(model, tok, subset: list, *, max_new_tokens: int = 128, batch_size: int = 8,
                          seq_len: int = 2048) -> dict:
    """Flat numbers for one metrics.jsonl line: eval_n, eval_avg_similarity, eval_exact_match, ... eval_seconds.

    Call on rank 0 with the unwrapped model and a subset chosen once with eval_subset (so every eval of a run
    scores the same examples). report.plot_loss draws eval_avg_similarity beside the loss.
    """
    t0 = time.perf_counter()
    res = evaluate_examples(model, tok, subset, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            seq_len=seq_len)
    out = {f"eval_{k}": v for k, v in res["overall"].items()}
    out["eval_seconds"] = time.perf_counter() - t0
    return out


# ---- the command -------------------------------------------------------------------------------------------
def _base_of_adapter(adapter: str) -> str | None:
    cfg = Path(adapter) / "adapter_config.json"
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") or None
    except FileNotFoundError:
        raise FileNotFoundError(f"{cfg} not found: --adapter must be a PEFT adapter directory "
                                "(the adapter/ folder of a training run)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: malformed JSON at line {e.lineno} ({e.msg})") from None


def _run_seq_len(adapter: str | None) -> int | None:
    """seq_len of the training run that wrote adapter/ (its resolved config.json sits beside it), if any."""
    if not adapter:
        return None
    try:
        v = json.loads((Path(adapter).parent / "config.json").read_text(encoding="utf-8")).get("seq_len")
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) and v > 0 else None


def _device_and_dtype(device: str):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA device is visible; use --device cpu")
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def load_for_eval(model_src: str | None, adapter: str | None, *, device: str = "auto", quantize=None):
    """(model, tokenizer, resolved model source). Without --model, an adapter's base model is used."""
    from model import load_model, load_tokenizer

    if model_src is None and adapter:
        model_src = _base_of_adapter(adapter)
    device, dtype = _device_and_dtype(device)
    model = load_model(model_src, dtype=dtype, device=device, quantize=quantize)
    tok = load_tokenizer(model_src)
    if adapter:
        from model.lora import load_adapter

        _base_of_adapter(adapter)  # a clear error for a wrong directory before load_adapter's own
        load_adapter(model, adapter)
    return model, tok, model_src or "smollm2-135m"


def read_eval_json(path) -> dict:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: baseline eval.json not found (run engine.evaluate without the adapter "
                                "first, e.g. --out runs/before)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: malformed JSON at line {e.lineno} ({e.msg}); pass an eval.json written by "
                         "engine.evaluate") from None
    if not isinstance(d, dict) or not isinstance(d.get("overall"), dict):
        raise ValueError(f"{p}: no 'overall' aggregates; pass an eval.json written by engine.evaluate")
    return d


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog="python -m engine.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_model_args(adapter_required=False)
    ap.add_argument("--data", required=True, help="acord:DIR, cuad:DIR, jsonl:FILE or synthetic")
    ap.add_argument("--split", default="test", help="train, valid or test")
    ap.add_argument("--limit", type=int, default=None,
                    help="evaluate N examples, a deterministic category-balanced subset (default: all)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="generation budget per answer")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="row budget (prompt + answer) in tokens; longer contexts are cut around the answer as "
                         "in training (default: the adapter's training run seq_len, else 2048)")
    ap.add_argument("--quantize", choices=("none", "nf4"), default="none",
                    help="load the base in NF4 (as QLoRA trained it) or full precision")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's choice). On a machine shared with other jobs "
                         "use 1: two OpenMP threads waiting on a busy core make each decode step ~100x slower")
    ap.add_argument("--metrics", default=None, help="a training run's metrics.jsonl: adds the loss curve")
    ap.add_argument("--compare", default=None, metavar="BASELINE_EVAL_JSON",
                    help="eval.json of a baseline run: prints metric | before | after | change")
    ap.add_argument("--out", required=True, help="output directory for eval.json, report.md and plots")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    return ap


def run(args) -> dict:
    for name in ("limit", "batch_size", "max_new_tokens", "seq_len", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.metrics and not Path(args.metrics).is_file():
        raise FileNotFoundError(f"{args.metrics}: metrics.jsonl not found (a training run writes OUT/metrics.jsonl)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seq_len is None:
        args.seq_len = _run_seq_len(args.adapter) or 2048
    baseline = read_eval_json(args.compare) if args.compare else None
    if baseline is not None and baseline.get("seq_len") not in (None, args.seq_len):
        print(f"note: the baseline was evaluated with --seq-len {baseline['seq_len']}, this run uses "
              f"{args.seq_len}: contexts are cut differently; pass the same --seq-len to both", file=sys.stderr)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")

    from data import load_source
    from data.validate import validate

    # the same checked examples training sees: answers repaired to the context's own text, unfindable ones dropped
    loaded, notes = load_source(args.data, args.split)
    examples, rep = validate(loaded, args.data, notes)
    if not examples:
        raise ValueError(f"{args.data}: no usable examples in split {args.split!r}")
    if rep.rejected and not args.quiet:
        print(f"note: {rep.rejected} of {rep.examples} examples dropped (answer not found in its context; "
              f"python -m data.check {args.data} lists them)", file=sys.stderr)
    subset = eval_subset(examples, args.limit)
    t0 = time.perf_counter()
    model, tok, model_src = load_for_eval(args.model, args.adapter, device=args.device,
                                          quantize=None if args.quantize == "none" else args.quantize)
    load_s = time.perf_counter() - t0
    if not args.quiet:
        print(f"evaluating {len(subset)} of {len(examples)} {args.split} examples from {args.data} "
              f"with {model_src}{' + ' + args.adapter if args.adapter else ''} (loaded in {load_s:.1f}s)",
              file=sys.stderr, flush=True)
    t1 = time.perf_counter()
    res = evaluate_examples(model, tok, subset, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            seq_len=args.seq_len, progress=not args.quiet)
    seconds = time.perf_counter() - t1
    result = {
        "model": model_src, "adapter": args.adapter, "data": args.data, "split": args.split,
        "limit": args.limit, "n_available": len(examples), "n_rejected": rep.rejected, "seq_len": args.seq_len,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "quantize": args.quantize,
        "device": str(next(model.parameters()).device), "threads": torch.get_num_threads(),
        "seconds": round(seconds, 2),
        "examples_per_s": round(len(subset) / seconds, 3) if seconds > 0 else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "baseline": args.compare, "metrics_jsonl": args.metrics, "definitions": METRIC_NOTES, **res,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_report(result, out, metrics_jsonl=args.metrics, baseline=baseline)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    o = result["overall"]
    print(f"{o['n']} examples in {seconds:.0f}s: avg similarity {o['avg_similarity']:.1f}, "
          f"excellent {o['excellent']:.1f}%, good {o['good']:.1f}%, exact match {o['exact_match']:.1f}%, "
          f"F1 {o['f1']:.1f}%")
    if baseline is not None:
        print(compare_table(baseline, result), end="")
    print(f"wrote {out / 'eval.json'} and {out / 'report.md'}")
    return result


def main(argv=None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
