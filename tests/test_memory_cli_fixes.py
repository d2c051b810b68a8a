"""`engine.memory` as a user reads it: --budget with offload says (and with --host-budget bounds) the host RAM its
answer takes, for every process of a launch; the table marks the rows it does not add up; the other checkpointing
choice is that choice predicted; --seq-len stops at the model's positions; --sdpa is checked against the device
and run by --measure; a closed stdout ends the command quietly (141), as a Unix tool."""
import dataclasses
import errno
import json
import sys

import pytest

from engine import memory
from engine.budget import SEQ_STEP, fit, on_card
from engine.ledger import Setup, fmt, format_table, predict
from engine.memory import measure_cpu
from model.config import LlamaConfig
from model.load import load_config

from .conftest import tiny_config_dict

GiB = 1024 ** 3
L, H = 28, 3072  # Llama 3.2 3B: layers, hidden size
# README's long-context question: the T4 recipe's shapes with offload and MLP tiles, what fits 15 GiB
LONG = ["--model", "llama-3.2-3b", "--seq-len", "2048", "--batch-size", "1", "--precision", "fp16", "--supervised",
        "512", "--offload", "--mlp-tile", "4096", "--capability", "7.5", "--lora-dropout", "0.05"]
LONG_SETUP = Setup(seq_len=2048, batch_size=1, precision="fp16", supervised=512, offload=True, mlp_tile=4096,
                   capability=(7, 5), lora_dropout=0.05)


def host_bytes(tokens: int) -> int:
    """What one process parks on the host under --offload: every block's fp16 input, [tokens, H] each."""
    return L * tokens * H * 2


def one_line(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.startswith("engine.memory: error:") and "\n" not in err, err
    for w in words:
        assert w in err, err


def test_budget_with_offload_says_the_host_ram_its_answer_takes_per_process_and_for_the_launch(capsys):
    """The answer (112,384 tokens) parks 18.01 GiB of block inputs in host RAM per process; the README's
    `./launch.sh --nproc 2` doubles it. Before, --budget printed the card's bytes only."""
    assert memory.main(LONG + ["--budget", "15GiB", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    seq = fit(load_config("llama-3.2-3b"), LONG_SETUP, 15 * GiB, "seq_len")
    answer = next(line for line in out.splitlines() if line.startswith("longest sequence at batch 1:"))
    assert f"{seq} tokens" in answer
    assert f"{fmt(host_bytes(seq))} of host RAM per process, {fmt(2 * host_bytes(seq))} for 2 processes" in answer
    assert f"seq {seq:>6}: " in out and f"host RAM {fmt(host_bytes(seq))} per process" in out
    assert memory.main(LONG + ["--budget", "15GiB", "--nproc", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["nproc"] == 2 and d["seq_len"]["at"]["host_bytes_per_process"] == host_bytes(seq)
    assert d["seq_len"]["at"]["host_bytes"] == 2 * host_bytes(seq)


def test_host_budget_bounds_the_answer_to_what_every_process_can_park_in_ram(capsys):
    cfg = load_config("llama-3.2-3b")
    assert memory.main(LONG + ["--budget", "15GiB", "--host-budget", "24GiB", "--nproc", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    seq, batch = d["seq_len"]["value"], d["batch_size"]["value"]
    # the host, not the card, is what stops it: two processes' block inputs at the answer fit 24 GiB, one step more
    # does not, and the card would take more
    assert 2 * host_bytes(seq) <= 24 * GiB < 2 * host_bytes(seq + SEQ_STEP)
    assert 2 * host_bytes(2048 * batch) <= 24 * GiB < 2 * host_bytes(2048 * (batch + 1))
    assert on_card(predict(cfg, dataclasses.replace(LONG_SETUP, seq_len=seq + SEQ_STEP))) < 15 * GiB
    assert seq < fit(cfg, LONG_SETUP, 15 * GiB, "seq_len")
    assert fit(cfg, LONG_SETUP, 15 * GiB, "seq_len", host_budget=24 * GiB, nproc=2) == seq
    assert memory.main(LONG + ["--budget", "15GiB", "--host-budget", "24GiB", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert f"longest sequence at batch 1: {seq} tokens" in out and "host budget 24.00 GiB" in out
    assert f"{fmt(2 * host_bytes(seq))} for 2 processes (" in out and "to spare)" in out


@pytest.mark.parametrize("extra, words", [(["--host-budget", "24GiB"], ["--host-budget", "--budget"]),
                                          (["--budget", "15GiB", "--host-budget", "lots"], ["--host-budget", "lots"]),
                                          (["--nproc", "0"], ["--nproc", "0"])])
def test_bad_host_budget_or_nproc_is_one_line(extra, words, capsys):
    assert memory.main(LONG + extra) == 2
    one_line(capsys, *words)


def test_the_table_counts_the_host_ram_of_every_process(capsys):
    assert memory.main(["--model", "llama-3.2-3b", "--seq-len", "32768", "--batch-size", "1", "--offload",
                        "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert f"host RAM for 2 processes' offloaded block inputs: {fmt(2 * L * 32768 * H * 2)}" in out


def test_budget_off_cuda_says_in_memory_not_on_the_card(capsys):
    assert memory.main(["--model", "smollm2-135m", "--seq-len", "1024", "--batch-size", "2", "--device", "cpu",
                        "--budget", "2GiB"]) == 0
    out = capsys.readouterr().out
    assert "on the card" not in out and " in memory " in out


def test_rows_shown_but_not_added_up_say_so():
    """The host's block inputs and the other checkpointing choice sit among the saved rows; the total leaves them
    out, and the table says which they are."""
    cfg = load_config("llama-3.2-3b")
    led = predict(cfg, Setup(seq_len=4096, batch_size=1, offload=True))
    table = format_table(led).splitlines()
    tagged = [r for r in led.rows if any(line.startswith(r.name) and line.endswith("(not in total)")
                                         for line in table)]
    assert {r.name for r in tagged} == {"block inputs on host (offload)", "(without checkpointing it would be)"}
    saved = [r for r in led.rows if r.group == "saved"]
    assert led.total("saved") == sum(r.bytes for r in saved) - sum(r.bytes for r in tagged)


def test_supervised_positions_are_called_tokens_not_rows(capsys):
    assert memory.main(["--model", "llama-3.2-3b", "--seq-len", "2048", "--batch-size", "2", "--supervised",
                        "512"]) == 0
    out = capsys.readouterr().out
    assert "512 supervised tokens" in out and "loss chunk (512 tokens × 128256 vocab)" in out
    assert "supervised rows" not in out and "512 rows" not in out


@pytest.mark.parametrize("kw", [
    dict(seq_len=2048, batch_size=2, precision="fp16", capability=(7, 5), pack=True, lora_dropout=0.05,
         loss_chunk=512),  # the T4 recipe: 4.12 GiB, and the line said 4.14 for it from the other side
    dict(seq_len=2048, batch_size=2, precision="fp16", supervised=512, capability=(7, 5)),
    dict(seq_len=8192, batch_size=1, mlp_tile=4096, supervised=512),
    dict(seq_len=32768, batch_size=1, offload=True),
    dict(seq_len=1024, batch_size=1, precision="fp32", device="cpu")])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_other_checkpointing_choice_is_what_predicting_it_gives(kw, checkpointing):
    cfg = load_config("llama-3.2-3b")
    s = Setup(checkpointing=checkpointing, **{**kw, "offload": kw.get("offload", False) and checkpointing})
    other = dataclasses.replace(s, checkpointing=not checkpointing, offload=False)
    led = predict(cfg, s)
    assert led.peak_other == predict(cfg, other).peak
    assert predict(cfg, other).peak_other == (led.peak if not s.offload else
                                             predict(cfg, dataclasses.replace(s, offload=False)).peak)
    line = next(x for x in format_table(led).splitlines() if x.startswith("peak with the other checkpointing"))
    assert line.split()[-2:] == fmt(predict(cfg, other).peak).split()


def test_seq_len_past_the_models_positions_is_refused_in_one_line(capsys):
    assert memory.main(["--model", "llama-3.2-3b", "--seq-len", "200000", "--batch-size", "1"]) == 2
    one_line(capsys, "--seq-len 200000", "131072")
    assert memory.main(["--model", "llama-3.2-3b", "--seq-len", "131072", "--batch-size", "1"]) == 0


@pytest.mark.parametrize("argv, words", [
    (["--sdpa", "flash", "--capability", "7.5"], ["--sdpa flash", "sm 7.5"]),
    (["--sdpa", "efficient", "--device", "cpu"], ["--sdpa efficient", "CPU"])])
def test_an_sdpa_kernel_the_device_lacks_is_refused_in_one_line(argv, words, capsys):
    assert memory.main(["--model", "llama-3.2-3b", "--seq-len", "2048", "--batch-size", "1"] + argv) == 2
    one_line(capsys, *words)


def test_measure_runs_the_sdpa_kernel_it_predicts():
    """--sdpa math keeps the (B, heads, T, T) attention probabilities per block; the measured step, run under that
    kernel, keeps them too (before, --measure ran PyTorch's own choice whatever --sdpa said)."""
    cfg = LlamaConfig.from_hf_dict(tiny_config_dict())
    s = Setup(seq_len=64, batch_size=2, lora_r=8, precision="fp32", device="cpu", checkpointing=False,
              supervised=32, loss_chunk=16)
    auto, math = (measure_cpu(cfg, dataclasses.replace(s, sdpa=k))["total saved"] for k in ("auto", "math"))
    probabilities = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * 64 * 64 * 4
    assert math - auto >= probabilities


class _Stdout:
    """A standard output whose writes fail: a reader that has gone (`| head -1`) or a full disk (`> /dev/full`)."""

    def __init__(self, error):
        self.error = error

    def write(self, _s):
        raise self.error

    def flush(self):
        pass


@pytest.mark.parametrize("extra", [[], ["--json"], ["--budget", "15GiB"], ["--budget", "15GiB", "--json"]])
def test_a_closed_stdout_ends_quietly_and_a_full_one_is_named(extra, monkeypatch, capsys):
    argv = ["--model", "llama-3.2-3b", "--seq-len", "2048", "--batch-size", "1"] + extra
    monkeypatch.setattr(sys, "stdout", _Stdout(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    with pytest.raises(SystemExit) as e:  # as a Unix tool killed by SIGPIPE: 128 + 13, nothing on stderr
        memory.main(argv)
    assert e.value.code == 141 and capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "stdout", _Stdout(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(SystemExit) as e:
        memory.main(argv)
    assert e.value.code == 2
    one_line(capsys, "standard output", "No space left on device")
