"""`engine.memory --budget`: the longest sequence and the largest batch the ledger says fit in a memory size."""
import dataclasses
import json

import pytest

from engine import memory
from engine.budget import SEQ_STEP, fit, on_card
from engine.ledger import Setup, predict
from engine.memory import parse_size
from model.load import load_config

GiB = 1024 ** 3

# the shapes the budget question is asked for: 3B QLoRA on a T4 (fp16), unpacked with offload and the recipe's packed
T4_SETUPS = [Setup(seq_len=2048, batch_size=1, precision="fp16", offload=True),
             Setup(seq_len=2048, batch_size=2, precision="fp16", pack=True, loss_chunk=512)]


def tiny_setup(**kw) -> Setup:
    return Setup(seq_len=512, batch_size=2, lora_r=8, precision="fp32", device="cpu", **kw)


def on_card_at(cfg, s: Setup, **knob) -> int:
    return on_card(predict(cfg, dataclasses.replace(s, **knob)))


@pytest.mark.parametrize("text, size", [("15GiB", 15 * GiB), ("16GB", 16 * 10 ** 9), ("15.5GiB", 31 * GiB // 2),
                                        ("800MiB", 800 * 1024 ** 2), ("16000000000", 16 * 10 ** 9),
                                        ("15 gib", 15 * GiB), ("512KiB", 512 * 1024), ("100B", 100)])
def test_budget_sizes_are_read_in_binary_and_decimal_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "15GiBs", "15G", "GiB", "-1GiB", "0GiB", "1e9", "15,5GiB"])
def test_a_bad_budget_size_names_the_flag_and_the_accepted_forms(text):
    with pytest.raises(ValueError, match=r"--budget: .* \(e\.g\. 15GiB, 16GB, 15\.5GiB, 800MiB or a byte count\)"):
        parse_size(text)


@pytest.mark.parametrize("s", T4_SETUPS + [Setup(seq_len=2048, batch_size=1, checkpointing=False)])
def test_the_3b_prediction_grows_with_sequence_and_batch(s):
    cfg = load_config("llama-3.2-3b")
    seqs = [on_card_at(cfg, s, seq_len=t) for t in range(SEQ_STEP, 131072 + 1, 4096 - SEQ_STEP)]
    batches = [on_card_at(cfg, s, batch_size=b) for b in range(1, 65)]
    assert seqs == sorted(seqs) and batches == sorted(batches)  # what fit()'s bisection relies on


def test_the_tiny_prediction_grows_with_sequence_and_batch(tiny_config):
    s = tiny_setup(pack=True)
    seqs = [on_card_at(tiny_config, s, seq_len=t) for t in range(SEQ_STEP, 2048 + 1, SEQ_STEP)]
    batches = [on_card_at(tiny_config, s, batch_size=b) for b in range(1, 65)]
    assert seqs == sorted(seqs) and batches == sorted(batches)


@pytest.mark.parametrize("what, step", [("seq_len", SEQ_STEP), ("batch_size", 1)])
@pytest.mark.parametrize("s", T4_SETUPS)
def test_the_3b_answer_fits_15gib_and_the_next_step_does_not(s, what, step):
    cfg = load_config("llama-3.2-3b")
    got = fit(cfg, s, 15 * GiB, what)
    assert got is not None and got % step == 0
    assert on_card_at(cfg, s, **{what: got}) <= 15 * GiB < on_card_at(cfg, s, **{what: got + step})


@pytest.mark.parametrize("what, step", [("seq_len", SEQ_STEP), ("batch_size", 1)])
def test_the_tiny_answer_fits_and_the_next_step_does_not(tiny_config, what, step):
    s = tiny_setup()
    # a budget between two steps of the grid: the answer is the lower one
    budget = (on_card_at(tiny_config, s, **{what: 3 * step}) + on_card_at(tiny_config, s, **{what: 4 * step})) // 2
    assert fit(tiny_config, s, budget, what) == 3 * step
    assert fit(tiny_config, s, on_card_at(tiny_config, s, **{what: 3 * step}), what) == 3 * step  # "at most"


def test_the_sequence_answer_stops_at_the_models_max_positions(tiny_config):
    assert fit(tiny_config, tiny_setup(), 10 ** 15, "seq_len") == tiny_config.max_position_embeddings


@pytest.mark.parametrize("what", ["seq_len", "batch_size"])
def test_none_when_even_the_smallest_step_does_not_fit(tiny_config, what):
    assert fit(tiny_config, tiny_setup(), 1, what) is None
    assert fit(load_config("llama-3.2-3b"), Setup(seq_len=2048, batch_size=1), 2 * GiB, what) is None


def test_the_cuda_budget_counts_the_context_and_the_allocator_slack():
    led = predict(load_config("llama-3.2-3b"), Setup(seq_len=2048, batch_size=1))
    outside = {r.name.split(" (")[0]: r.bytes for r in led.rows if r.group == "outside"}
    assert set(outside) == {"CUDA context", "allocator slack"}
    assert on_card(led) == led.peak + sum(outside.values())


def test_cli_budget_prints_both_answers_for_the_3b_preset_without_a_gpu(capsys):
    argv = ["--model", "llama-3.2-3b", "--seq-len", "2048", "--batch-size", "1", "--precision", "fp16", "--offload"]
    assert memory.main(argv + ["--budget", "15GiB"]) == 0
    out = capsys.readouterr().out
    cfg, s = load_config("llama-3.2-3b"), T4_SETUPS[0]
    seq, batch = fit(cfg, s, 15 * GiB, "seq_len"), fit(cfg, s, 15 * GiB, "batch_size")
    assert f"longest sequence at batch 1: {seq} tokens" in out
    assert f"largest batch at sequence 2048: {batch} rows" in out
    assert "to spare" in out and "over by" in out  # the answer and the next step up, so the margin shows
    assert memory.main(argv + ["--budget", "15GiB", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["seq_len"]["value"], d["batch_size"]["value"]) == (seq, batch)
    assert d["seq_len"]["at"]["fits"] and not d["seq_len"]["next"]["fits"]
    assert d["batch_size"]["next"]["batch_size"] == batch + 1
    assert d["seq_len"]["at"]["on_card_bytes"] > d["seq_len"]["at"]["peak_allocated_bytes"]


@pytest.mark.parametrize("extra", [["--budget", "15 gigs"], ["--budget", "15GiB", "--measure"]])
def test_cli_bad_budget_is_a_one_line_error(extra, capsys):
    assert memory.main(["--model", "llama-3.2-3b", "--seq-len", "2048", "--batch-size", "1"] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engine.memory: error: --budget") and "\n" not in err
