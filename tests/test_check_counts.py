"""data.check's figures for --seq-len are training's own (data.batch.encode_example), a fit / calib part is named as
such, and a reader that stops early (`| head`) ends the command quietly."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from data.batch import encode_examples
from data.check import token_stats

REPO = Path(__file__).resolve().parents[1]


def _check(*args):
    return subprocess.run([sys.executable, "-m", "data.check", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def test_seq_len_counts_are_what_encode_example_does(llama3_tok, shared_datasets):
    """ACORD at 2048 tokens with Llama 3.2's tokenizer: data.check said 70 long clauses were cut to their first
    tokens ("fits in the context but not twice"); training cut 192. Shortened contexts counted the skipped too."""
    from data.validate import load_validated

    examples, _ = load_validated(f"acord:{shared_datasets / 'acord'}")
    encoded, stats = encode_examples(llama3_tok, examples, 2048)
    got = token_stats(examples, 2048, llama3_tok)
    assert got["answer_too_long"] == len(stats.skipped) > 0
    assert got["over_seq_len"] == stats.truncated   # shortened, the skipped apart
    assert got["answer_target_cut"] == stats.target_cut > 0
    r = _check(f"acord:{shared_datasets / 'acord'}", "--split", "valid", "--seq-len", "512", "--tokenizer",
               llama3_tok.source, "--json")
    assert r.returncode == 0, r.stderr
    valid = [e for e in examples if e.split == "valid"]
    encoded, stats = encode_examples(llama3_tok, valid, 512)
    tokens = json.loads(r.stdout)["tokens"]
    assert (tokens["over_seq_len"], tokens["answer_target_cut"], tokens["answer_too_long"]) == \
        (stats.truncated, stats.target_cut, len(stats.skipped))


def test_the_estimate_without_a_tokenizer_applies_the_same_rule():
    """A clause a third of the row: it fits twice, so the old rule said its target was whole; encode_example keeps
    half the room its copy leaves for other text, so its target is cut (here: 4 characters a token exactly)."""
    from data import Example

    clause = " ".join(["abc"] * 170)   # 680 characters: 170 tokens at 4 characters a token
    ctx = "\n\n".join([" ".join(["xyz"] * 400), clause, " ".join(["uvw"] * 400)])
    ex = Example("e", "jsonl", "c", "Term", ctx, clause, "train")
    got = token_stats([ex], 512, None)
    assert got["over_seq_len"] == 1 and got["answer_target_cut"] == 1 and got["answer_too_long"] == 0
    assert token_stats([ex], 1024, None)["answer_target_cut"] == 0   # room for the clause three times
    too_long = token_stats([ex], 180, None)
    assert (too_long["over_seq_len"], too_long["answer_too_long"]) == (0, 1)   # the skipped are not "shortened"


def test_a_part_of_train_is_labelled_as_such(shared_datasets):
    r = _check(f"acord:{shared_datasets / 'acord'}", "--split", "calib")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    head = next(ln for ln in lines if ln.startswith("split calib:"))
    n, of = int(head.split()[2]), int(head.split("train split's ")[1].split()[0])
    assert 0 < n < of and f"({n / of:.1%}, cut by whole queries)" in head
    row = lines[lines.index("per split:") + 1]
    assert row.startswith("  calib (part of train) ") and "  train " not in r.stdout.split("per split:")[1]
    assert f"examples: {n} " in r.stdout


def test_a_closed_stdout_ends_quietly_with_141():
    p = subprocess.Popen([sys.executable, "-m", "data.check", "synthetic", "--json"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    p.stdout.close()   # the reader is gone before the report is written (`| head` that has read its lines)
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 128 + signal.SIGPIPE and err == "", err
