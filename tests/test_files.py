"""model/files.py: atomic file and directory writes leave the old version or the new one, never a part, and
never a temporary behind; what they create gets the permissions the umask gives a plain open()/mkdir()."""
import os
import stat

import pytest

from model.files import atomic_dir, atomic_file, atomic_write_text, umask


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_text_replaces_the_file_with_open_permissions(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old")
    atomic_write_text(path, "new ✓\n")
    assert path.read_text(encoding="utf-8") == "new ✓\n"
    assert mode(path) == 0o666 & ~umask()  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_failed_file_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_atomic_dir_replaces_the_directory_as_a_whole(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "stale.bin").write_text("from the previous save")
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent.resolve() and tmp.name.startswith(".adapter.tmp-")
        (tmp / "adapter_config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary, no .old
    assert mode(out) == 0o777 & ~umask() and mode(out / "adapter_config.json") == 0o666 & ~umask()


def test_failed_directory_write_leaves_the_old_directory_untouched(tmp_path):
    out = tmp_path / "step-4"
    out.mkdir()
    (out / "state.json").write_text("old")
    with pytest.raises(SystemExit):
        with atomic_dir(out, tmp_name="step-4.tmp", fsync=True) as tmp:
            assert tmp == out.resolve().with_name("step-4.tmp")
            (tmp / "state.json").write_text("half")
            raise SystemExit(143)
    assert (out / "state.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["step-4"]


def test_fixed_tmp_name_left_by_a_crash_is_cleared_first(tmp_path):
    (tmp_path / "step-2.tmp").mkdir()
    (tmp_path / "step-2.tmp" / "junk").write_text("from a killed save")
    with atomic_dir(tmp_path / "step-2", tmp_name="step-2.tmp") as tmp:
        assert not any(tmp.iterdir())
        (tmp / "state.json").write_text("{}")
    assert [p.name for p in (tmp_path / "step-2").iterdir()] == ["state.json"]
