"""The reference recipes for Llama 3.2 3B on 2×T4, launched as the README says, with only the model swapped for a
tiny random Llama of the same format (Llama 3.2's real tokenizer, vocab 128256, tied embeddings, llama3 RoPE)
and the run shortened: on the CPU, two gloo processes, real ACORD rows. What this cannot check is the GPU and
the real weights; everything between the config file and the adapter on disk runs."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, save_tiny_hf


@pytest.fixture(scope="module")
def llama3_tiny(tmp_path_factory, llama3_tokenizer_json):
    path = tmp_path_factory.mktemp("llama3") / "tiny-llama3"
    save_tiny_hf(path, vocab_size=128256, tie_word_embeddings=True, bos_token_id=128000,
                 eos_token_id=[128001, 128008, 128009], max_position_embeddings=8192)
    shutil.copy(llama3_tokenizer_json, path / "tokenizer.json")
    return path


def _launch(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": os.environ.get("PYTHON", "python")}
    return subprocess.run(["./launch.sh", "--nproc", "2", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _steps(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_the_channel_recipe_runs_as_launched(llama3_tiny, shared_datasets, tmp_path):
    """./launch.sh --nproc 2 --channel --config configs/llama3_2_3b_acord_channel_t4x2.toml: NF4 base,
    checkpointing, ACORD's fit split, the llama3 chat format; its checkpoint and adapter are read back by
    engine.evaluate --decode channel."""
    out = tmp_path / "channel"
    r = _launch("--channel", "--config", "configs/llama3_2_3b_acord_channel_t4x2.toml", "--model", str(llama3_tiny),
                "--out", str(out), "--max-steps", "2", "--save-every", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fit examples of acord:../shared/datasets/acord" in r.stderr and "(2 processes)" in r.stderr
    assert _steps(out) == [1, 2]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["quantize"], saved["checkpointing"], saved["split"], saved["processes"]) == ("nf4", True, "fit", 2)
    assert (out / "checkpoints" / "step-1" / "state.json").is_file()
    ev = tmp_path / "ev"
    r = subprocess.run([sys.executable, "-m", "engine.evaluate", "--model", str(llama3_tiny), "--adapter",
                        str(out / "checkpoints" / "step-1" / "adapter"), "--data", "acord:../shared/datasets/acord",
                        "--split", "test", "--limit", "2", "--decode", "channel", "--threads", "1", "--quiet",
                        "--out", str(ev)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads((ev / "eval.json").read_text())["rows"]) == 2


def test_the_token_loss_recipe_runs_as_launched(llama3_tiny, shared_datasets, tmp_path):
    """./launch.sh --nproc 2 --config configs/llama3_2_3b_acord_t4x2.toml (engine.train): packed rows of 2048
    tokens, NF4, checkpointing, loss chunks of 512; two steps."""
    out = tmp_path / "token"
    r = _launch("--config", "configs/llama3_2_3b_acord_t4x2.toml", "--model", str(llama3_tiny), "--out", str(out),
                "--max-steps", "2", "--eval-every", "0", "--eval-generate", "0", "--save-every", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(out) == [1, 2] and (out / "adapter" / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert (saved["seq_len"], saved["quantize"], saved["loss_chunk"]) == (2048, "nf4", 512)
