"""model/files.py: atomic file and directory writes leave the old version or the new one, never a part, and
never a temporary behind; what they create gets the permissions the umask gives a plain open()/mkdir()."""
import os
import stat

import pytest

from pathlib import Path

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


# ---- where staged_files stages, what a failure names, what it advises, fsync ------------------------------------
def _refuse_dir(monkeypatch, refused):
    """tempfile.mkstemp/mkdtemp in `refused` fail with EACCES: a parent that is not writable (a mount point, a
    container volume) holding a directory that is."""
    import errno
    import tempfile

    import model.files

    real_stemp, real_dtemp = tempfile.mkstemp, tempfile.mkdtemp

    def guard(real):
        def make(*a, dir=None, **k):
            if dir is not None and os.path.realpath(dir) == os.path.realpath(refused):
                raise PermissionError(errno.EACCES, "Permission denied")
            return real(*a, dir=dir, **k)
        return make

    monkeypatch.setattr(model.files.tempfile, "mkstemp", guard(real_stemp))
    monkeypatch.setattr(model.files.tempfile, "mkdtemp", guard(real_dtemp))


def test_staged_files_stages_where_check_writable_probes(tmp_path, monkeypatch):
    """An existing writable OUT in a read-only parent passes the early check and is written; a missing OUT in
    that parent fails the early check, as staging it would."""
    from model.files import WriteError, check_writable, staged_files

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _refuse_dir(monkeypatch, tmp_path)
    check_writable(out)
    with staged_files(out) as tmp:
        assert tmp.parent == out.resolve() and tmp.name.startswith(".out.tmp-")
        (tmp / "eval.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "notes.txt"]  # no temporary left inside
    with pytest.raises(WriteError, match="cannot write there"):
        check_writable(tmp_path / "new")
    with pytest.raises(WriteError):
        with staged_files(tmp_path / "new"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_nested_write_that_fails_names_the_destination_not_the_temporary(tmp_path, monkeypatch):
    from model.files import WriteError, atomic_dir, staged_files

    def enospc(*_a, **_k):
        raise OSError(28, "No space left on device")

    for outer in (staged_files, atomic_dir):
        out = tmp_path / outer.__name__
        with pytest.raises(WriteError) as e:
            with outer(out) as tmp:
                (tmp / "sub").mkdir()
                monkeypatch.setattr(Path, "write_bytes", enospc)
                atomic_write_text(tmp / "sub" / "plot.png" if outer is atomic_dir else tmp / "plot.png", "png")
        monkeypatch.undo()
        want = out.resolve() / ("sub/plot.png" if outer is atomic_dir else "plot.png")
        assert str(e.value).startswith(f"{want}: cannot write it (No space left on device)"), e.value
        assert ".tmp" not in str(e.value)
    with pytest.raises(WriteError) as e:  # a plain open() of a file in the temporary: the same
        with staged_files(tmp_path / "o") as tmp:
            open(tmp / "missing" / "eval.json", "w")
    assert str(e.value).startswith(f"{(tmp_path / 'o').resolve() / 'missing' / 'eval.json'}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("code, says, not_says", [
    (28, "free disk space", "writable"), (122, "free disk space", "writable"),
    (13, "choose a writable location", "disk space"), (30, "choose a writable location", "disk space"),
    (2, "does not exist", "disk space"), (21, "is a directory", "disk space")])
def test_the_advice_follows_the_errno(tmp_path, code, says, not_says):
    from model.files import WriteError, _write_error

    err = _write_error(tmp_path / "x.json", OSError(code, os.strerror(code)))
    assert isinstance(err, WriteError) and says in str(err) and not_says not in str(err), err


def test_make_dirs_names_the_file_in_the_way(tmp_path):
    from model.files import WriteError, make_dirs

    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / "afile", tmp_path / "afile" / "deeper" / "dir"):
        with pytest.raises(WriteError) as e:
            make_dirs(target)
        msg = str(e.value)
        assert msg.startswith(f"{target}: cannot create this directory") and "\n" not in msg
        assert f"{tmp_path / 'afile'} is a file in the way" in msg and "disk space" not in msg, msg
    assert make_dirs(tmp_path / "a" / "b").is_dir()


def test_each_file_is_flushed_before_its_rename_and_a_late_full_disk_fails_the_write(tmp_path, monkeypatch):
    """On NFS/FUSE a full disk can surface only at fsync (Rust writers ignore close()'s error): it must fail
    the write, naming the destination, rather than rename a truncated file into place."""
    import errno

    from model.files import WriteError, staged_files

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    atomic_write_text(tmp_path / "a.json", "{}")
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "adapter_model.safetensors").write_text("w")
        (tmp / "adapter_config.json").write_text("{}")
    assert sum(".a.json." in s for s in synced) == 1
    assert sum(".adapter.tmp-" in s for s in synced) == 2

    def late_enospc(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", late_enospc)
    for write in (lambda: atomic_write_text(tmp_path / "a.json", "new"),
                  lambda: _fill(atomic_dir(tmp_path / "adapter")), lambda: _fill(staged_files(tmp_path / "o"))):
        with pytest.raises(WriteError, match=r": cannot write it \(No space left on device\); free disk space"):
            write()
    assert (tmp_path / "a.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "adapter"]


def _fill(ctx):
    with ctx as tmp:
        (tmp / "f.bin").write_text("x")
