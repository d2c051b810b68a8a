"""`engine.memory --config RECIPE.toml`: the ledger for the run a training recipe describes. engine.memory's own
defaults differ from engine.train's (checkpointing on, packing off), so a recipe's knobs, and engine.train's
defaults for the knobs it leaves out, are what the prediction starts from; flags given on the command line
override the file, as with engine.train --config."""
import json
from pathlib import Path

import pytest

from engine import memory

REPO = Path(__file__).resolve().parents[1]
T4_RECIPE = str(REPO / "configs" / "llama3_2_3b_acord_t4x2.toml")
# the recipe's model is the gated hub id: both sides take the preset of the same shapes instead
MODEL = ["--model", "llama-3.2-3b"]


def _ledger(capsys, argv) -> dict:
    assert memory.main(argv + ["--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_the_t4_recipe_predicts_what_its_flags_by_hand_predict(capsys):
    by_file = _ledger(capsys, ["--config", T4_RECIPE, "--capability", "7.5"] + MODEL)
    by_hand = _ledger(capsys, MODEL + ["--seq-len", "2048", "--batch-size", "2", "--pack", "--checkpointing",
                                       "--no-offload", "--mlp-tile", "0", "--loss-chunk", "512", "--lora-r", "16",
                                       "--lora-dropout", "0.05", "--quantize", "nf4", "--no-double-quant",
                                       "--optimizer", "adamw", "--precision", "fp16", "--capability", "7.5"])
    assert by_file == by_hand
    s = by_file["setup"]
    assert (s["precision"], s["pack"], s["lora_dropout"], s["loss_chunk"]) == ("fp16", True, 0.05, 512)


def test_flags_on_the_command_line_override_the_recipe(capsys):
    d = _ledger(capsys, ["--config", T4_RECIPE, "--seq-len", "65536", "--batch-size", "1", "--no-pack",
                         "--offload", "--mlp-tile", "4096", "--supervised", "512", "--capability", "7.5"] + MODEL)
    s = d["setup"]
    assert (s["seq_len"], s["batch_size"], s["pack"], s["offload"], s["mlp_tile"]) == (65536, 1, False, True, 4096)
    assert s["lora_dropout"] == 0.05 and s["loss_chunk"] == 512  # the rest from the file


def test_knobs_a_recipe_leaves_out_take_engine_trains_defaults(tmp_path, capsys):
    """A recipe that says nothing of checkpointing or packing trains without checkpointing and packed
    (engine.config.TrainConfig), whatever engine.memory's own defaults are."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "smollm2-135m"\nseq_len = 256\nbatch_size = 2\nlr = 1e-4\ndata = "synthetic"\n')
    s = _ledger(capsys, ["--config", str(recipe)])["setup"]
    assert (s["seq_len"], s["batch_size"], s["checkpointing"], s["pack"]) == (256, 2, False, True)
    plain = _ledger(capsys, ["--model", "smollm2-135m", "--seq-len", "256", "--batch-size", "2"])["setup"]
    assert (plain["checkpointing"], plain["pack"]) == (True, False)  # engine.memory's defaults, unchanged


def test_the_channel_recipe_is_read_too(capsys):
    """data.check --channel prints `engine.memory --config RECIPE.toml ...` for the channel recipe: its own keys
    (unit, max_candidates, ...) change no byte and are passed over; its lora_r and checkpointing are taken."""
    recipe = str(REPO / "configs" / "llama3_2_3b_acord_channel_t4x2.toml")
    s = _ledger(capsys, ["--config", recipe, "--seq-len", "3161", "--batch-size", "1", "--pack", "--supervised",
                         "726", "--capability", "7.5"] + MODEL)["setup"]
    assert (s["checkpointing"], s["lora_r"], s["precision"], s["pack"]) == (True, 16, "fp16", True)


@pytest.mark.parametrize("text, words", [('seq_len = 256\nbatch_size = 1\nlora_dropuot = 0.1\n', "unknown key"),
                                         ('seq_len = "long"\nbatch_size = 1\n', "seq_len"),
                                         ('seq_len = 256\nbatch_size = 1\nquantize = "int3"\n', "quantize"),
                                         ('seq_len = 256\n[oops\n', "invalid TOML")])
def test_a_bad_recipe_is_a_one_line_error_naming_the_file_and_key(tmp_path, capsys, text, words):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    assert memory.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engine.memory: error:") and str(recipe) in err and words in err and "\n" not in err


def test_seq_len_and_batch_size_are_still_required_without_a_recipe(capsys):
    with pytest.raises(SystemExit) as e:
        memory.main(["--model", "smollm2-135m"])
    assert e.value.code == 2
    assert "--seq-len" in capsys.readouterr().err


def test_auto_precision_follows_the_capability_predicted_for(capsys):
    args = ["--model", "llama-3.2-3b", "--seq-len", "512", "--batch-size", "1"]
    assert _ledger(capsys, args + ["--capability", "7.5"])["setup"]["precision"] == "fp16"  # a T4: no bf16
    assert _ledger(capsys, args + ["--capability", "9.0"])["setup"]["precision"] == "bf16"


def test_a_channel_recipe_that_leaves_a_knob_out_takes_channel_trains_default(tmp_path):
    """engine.channel_train checkpoints by default (engine.train does not): a channel recipe without the key
    trains with checkpointing, and its prediction must too (11.78 GiB without it against 3.71 GiB with)."""
    text = (REPO / "configs" / "llama3_2_3b_acord_channel_t4x2.toml").read_text()
    recipe = tmp_path / "channel.toml"
    recipe.write_text("\n".join(x for x in text.splitlines() if not x.startswith("checkpointing")) + "\n")
    assert "checkpointing" not in recipe.read_text()
    assert memory.recipe_defaults(recipe)["checkpointing"] is True
    assert memory.recipe_defaults(REPO / "configs" / "llama3_2_3b_acord_t4x2.toml")["checkpointing"] is True


def test_config_without_a_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        memory.main(["--config"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "--config" in err and "\n" not in err
