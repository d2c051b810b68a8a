"""TrainConfig: TOML + CLI overrides, type checks, unknown keys, one-line errors, resolved config.json."""
import json
import subprocess
import sys

import pytest

from engine.config import FIELDS, ConfigError, TrainConfig, build_parser, parse_args, save
from tests.conftest import REPO


def _toml(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return str(p)


def test_cli_overrides_toml(tmp_path):
    path = _toml(tmp_path, 'lora_r = 8\nlr = 1e-4\nlora_targets = ["q_proj", "v_proj"]\ncheckpointing = true\n')
    cfg = parse_args(["--config", path, "--lora-r", "4", "--no-checkpointing", "--seq-len", "256"])
    assert (cfg.lora_r, cfg.lr, cfg.checkpointing, cfg.seq_len) == (4, 1e-4, False, 256)
    assert cfg.lora_targets == ["q_proj", "v_proj"]


def test_int_in_toml_is_accepted_for_float_field(tmp_path):
    cfg = parse_args(["--config", _toml(tmp_path, "lora_alpha = 16\n")])
    assert cfg.lora_alpha == 16.0 and isinstance(cfg.lora_alpha, float)


def test_unknown_toml_key_is_one_line_error_naming_key_and_file(tmp_path):
    path = _toml(tmp_path, "lora_rank = 8\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", path])
    msg = str(e.value)
    assert "lora_rank" in msg and path in msg and "\n" not in msg


def test_wrong_type_in_toml_is_one_line_error(tmp_path):
    path = _toml(tmp_path, 'seq_len = "long"\n')
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", path])
    assert "seq_len" in str(e.value) and "int" in str(e.value) and "\n" not in str(e.value)


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        parse_args(["--config", _toml(tmp_path, "batch_size = true\n")])


def test_wrong_type_on_cli_is_error():
    with pytest.raises(ConfigError, match="--lora-r"):
        parse_args(["--lora-r", "sixteen"])


def test_unknown_cli_flag_is_error():
    with pytest.raises(ConfigError, match="--lora-rank"):
        parse_args(["--lora-rank", "8"])


def test_bad_choice_and_bad_value_are_errors():
    with pytest.raises(ConfigError, match="precision"):
        parse_args(["--precision", "fp8"])
    with pytest.raises(ConfigError, match="seq_len"):
        parse_args(["--seq-len", "0"])
    with pytest.raises(ConfigError, match="lora_targets"):
        parse_args(["--lora-targets", "q_proj,lm_head"])
    with pytest.raises(ConfigError, match="mlp_tile must be >= 0"):
        parse_args(["--mlp-tile", "-1"])
    assert parse_args(["--mlp-tile", "4096"]).mlp_tile == 4096
    # numpy's seeded generators refuse a negative seed only at the first batch, after the model has loaded
    for seed in ("-1", str(2**32)):
        with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*32\)"):
            parse_args(["--seed", seed])
    assert parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1
    with pytest.raises(ConfigError, match="out must name a directory"):
        parse_args(["--out", ""])  # would train into the current directory


def test_every_field_has_a_flag_and_help():
    help_text = build_parser().format_help()
    for name, f in FIELDS.items():
        assert "--" + name.replace("_", "-") in help_text
        assert f.metadata["help"]


def test_resolved_config_roundtrips_through_json(tmp_path):
    cfg = parse_args(["--lora-r", "4", "--data", "jsonl:x.jsonl"])
    save(cfg, tmp_path / "config.json")
    back = json.loads((tmp_path / "config.json").read_text())
    assert TrainConfig(**back) == cfg


def test_shipped_configs_parse():
    """engine.train's recipes; those named *channel* are engine.channel_train's (tests/test_channel_resume.py)."""
    found = [p for p in sorted((REPO / "configs").glob("*.toml")) if "channel" not in p.name]
    assert len(found) >= 3
    for p in found:
        parse_args(["--config", str(p)])


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    path = _toml(tmp_path, "warmup = 10\n")
    r = subprocess.run([sys.executable, "-m", "engine.train", "--config", path], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "warmup" in r.stderr and path in r.stderr
    assert not (tmp_path / "runs").exists()


def test_every_command_prints_its_help():
    """--help formats every flag's help (a bare '%' in one would make argparse raise instead)."""
    from engine import bench, memory

    for parser in (build_parser(), memory.build_parser(), bench.build_parser()):
        assert "--" in parser.format_help()


def test_a_byte_order_mark_is_read_past(tmp_path, capsys):
    """Windows editors save UTF-8 with a BOM; tomllib read it as 'Invalid statement (at line 1, column 1)'. Both
    trainers' --config read past it (engine.config.read_toml)."""
    from engine.channel_train import build_parser as channel_parser
    from engine.cli import parse_with_config

    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbflr = 0.001\nmax_steps = 7\n")
    cfg = parse_args(["--config", str(path)])
    assert (cfg.lr, cfg.max_steps) == (0.001, 7)
    args = parse_with_config(channel_parser(), ["--config", str(path)])
    assert (args.lr, args.max_steps) == (0.001, 7)


def test_a_channel_recipe_given_to_engine_train_says_to_add_channel():
    """./launch.sh --config configs/*_channel_*.toml without --channel ran engine.train, which said only
    "unknown key 'split'"."""
    recipe = str(REPO / "configs" / "llama3_2_3b_acord_channel_t4x2.toml")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", recipe])
    msg = str(e.value)
    assert msg.startswith(f"{recipe}: unknown key ") and "\n" not in msg
    assert "engine.channel_train recipe" in msg and "add --channel to ./launch.sh" in msg
    assert f"python -m engine.channel_train --config {recipe}" in msg


def test_an_engine_train_recipe_given_to_channel_train_says_to_drop_channel(tmp_path, capsys):
    """The reverse, and the usage line's "(see ... --help)" once (it was there twice)."""
    from engine.channel_train import main

    recipe = str(REPO / "configs" / "llama3_2_3b_acord_t4x2.toml")
    with pytest.raises(SystemExit) as e:
        main(["--config", recipe])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {recipe}: unknown key ")
    assert "engine.train recipe" in err and "drop --channel" in err and err.count("--help") == 1, err
    typo = _toml(tmp_path, 'data = "synthetic"\ngroups_per_stpe = 4\n')  # a typo in a channel recipe
    with pytest.raises(SystemExit):
        main(["--config", typo])
    err = capsys.readouterr().err
    assert "unknown key 'groups_per_stpe'" in err and "engine.train recipe" not in err and err.count("--help") == 1, err
