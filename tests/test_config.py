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
