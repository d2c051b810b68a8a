"""Atomic writes, the one place the project does them: a file or a directory is written under a temporary name
beside its destination and renamed into place, so a reader (an evaluation, a resumed run, a Hub upload) sees the
old version or the new one, never half of one. model/ and engine/ both write through here.

The temporary is always a sibling, never in /tmp: a rename is atomic only within one filesystem. What the
temporaries are called matters to the code that cleans up after a crash (engine/checkpoint.remove_partial,
engine/export.build), so the names are part of this module's contract:
  file       .NAME.XXXXXXXX.tmp
  directory  .NAME.tmp-XXXXXXXX (or the caller's fixed tmp_name); its predecessor, during the swap, <tmp>.old
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError


class WriteError(OSError):
    """A write that failed (full disk, read-only or missing directory), named by its destination rather than
    the temporary it was going to: one line that says what to do."""


def _write_error(path: Path, e: BaseException) -> BaseException:
    """The error to raise for `e` while writing `path`: a WriteError naming it for I/O failures (safetensors
    reports a full disk as its own error), `e` itself for anything else or when already named."""
    if isinstance(e, WriteError) or not isinstance(e, OSError | SafetensorError):
        return e
    why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
    err = WriteError(f"{path}: cannot write it ({why}); free disk space or choose a writable location")
    err.__cause__ = e
    return err


def umask() -> int:
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_like_umask(root: Path) -> None:
    """Give root and everything under it the permissions a plain open()/mkdir() would (0666/0777 minus the
    umask): mkdtemp makes directories 0700 and safetensors writes its files 0600, which would keep an adapter,
    a checkpoint or an export from the other users a shared machine's umask lets read it."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for p in Path(root).rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (the names created or renamed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write (by name: safetensors, savefig); on success
    it gets open()'s permissions and replaces `path`, on error it is removed and `path` is untouched."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str) -> None:
    """UTF-8, whatever the locale."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(path, *, tmp_name: str | None = None, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path` as a whole, on error it is
    removed and `path` is untouched.

    tmp_name: a fixed name for the temporary (a crash's leftover of that name is removed first), for callers
      whose cleanup looks for it by name; by default a unique `.NAME.tmp-XXXXXXXX`, so two writers never share one.
    fsync: flush the temporary's entries before the rename and the parent's after it (checkpoints: a power cut
      must not leave a step-N whose files are missing). The files themselves are the caller's to fsync.

    An existing `path` is moved aside to `<tmp>.old` first and deleted only once the new one is in place, so at
    every moment one complete version exists under one of the two names.
    """
    path = Path(path).resolve()  # a relative "." or "x/.." has no usable name to derive siblings from
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp_name is None:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        else:
            tmp = path.parent / tmp_name
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
    except OSError as e:
        raise _write_error(path, e)
    try:
        yield tmp
        share_like_umask(tmp)  # mkdtemp's 0700 and safetensors' 0600 -> what the umask allows
        if fsync:
            fsync_dir(tmp)
        old = None
        if path.exists():
            old = tmp.with_name(f"{tmp.name}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(path, e)


def check_writable(path, flag: str = "--out") -> None:
    """Fail now, naming the flag, when `path` (a directory to create or fill) could not be written: before a long
    job rather than after it. Creates nothing: a temporary file is made and removed in the nearest existing
    directory at or above `path`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(f"{flag} {path} exists and is not a directory; pick another {flag}")
    probe = path
    while not probe.exists():
        probe = probe.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise WriteError(f"{flag} {path}: cannot write there ({e.strerror or e}); pick a writable {flag}") from None


@contextmanager
def staged_files(path) -> Iterator[Path]:
    """Yield a temporary sibling directory for a command's output files; on success each is moved into the
    directory `path` (created when missing; files already there under other names stay), on error while they
    are written the temporary is removed and `path` is as it was (only the renames, which write no data, come
    after). For outputs that share a directory with others (an evaluation's report
    beside what the user keeps there), where atomic_dir's swap of the whole directory would be wrong."""
    path = Path(path).resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise _write_error(path, e)
    try:
        yield tmp
        share_like_umask(tmp)
        path.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, path / f.name)
        tmp.rmdir()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(path, e)

