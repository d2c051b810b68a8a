"""Atomic writes, the one place the project does them: a file or a directory is written under a temporary name
beside its destination and renamed into place, so a reader (an evaluation, a resumed run, a Hub upload) sees the
old version or the new one, never half of one. model/ and engine/ both write through here.

The temporary is always a sibling (staged_files: inside the existing output directory), never in /tmp: a rename
is atomic only within one filesystem. Each file is fsync'd before its rename, so a full disk that a network
filesystem reports only then fails the write instead of renaming a truncated file into place. What the
temporaries are called matters to the code that cleans up after a crash (engine/checkpoint.remove_partial,
engine/export.build), so the names are part of this module's contract:
  file       .NAME.XXXXXXXX.tmp
  directory  .NAME.tmp-XXXXXXXX (or the caller's fixed tmp_name); its predecessor, during the swap, <tmp>.old
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError


class WriteError(OSError):
    """A write that failed (full disk, read-only or missing directory), named by its destination rather than
    the temporary it was going to: one line that says what to do. `path` is the file or directory named,
    `why` the system's reason (so an enclosing atomic write can name its own destination instead)."""

    def __init__(self, message: str, path: Path | None = None, why: str = "", verb: str = "cannot write it",
                 code: int | None = None):
        super().__init__(message)
        self.path, self.why, self.verb, self.code = path, why, verb, code


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors, tokenizers) report one


def _errno(e: BaseException) -> int | None:
    if isinstance(e, WriteError):
        return e.code
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    m = _OS_ERROR.search(str(e))
    return int(m[1]) if m else None


def _in_the_way(path: Path) -> Path:
    """The nearest existing non-directory at or above `path` (what ENOTDIR/EEXIST complain about), else path."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return p if not p.is_dir() else path
    return path


def _advice(path: Path, code: int | None) -> str:
    """What to do about an error `code` (an errno) while writing `path`."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose a writable location"
    if code == errno.ENOENT:
        return f"its directory {path.parent} does not exist; create it or choose another location"
    if code == errno.EISDIR:
        return f"{path} is a directory; remove it or choose another name"
    if code in (errno.ENOTDIR, errno.EEXIST):
        return f"{_in_the_way(path)} is a file in the way; remove it or choose another location"
    return "free disk space or choose a writable location"


def _named(path: Path, why: str, code: int | None, verb: str = "cannot write it") -> WriteError:
    return WriteError(f"{path}: {verb} ({why}); {_advice(path, code)}", path, why, verb, code)


def _write_error(path: Path, e: BaseException, verb: str = "cannot write it") -> BaseException:
    """The error to raise for `e` while writing `path`: a WriteError naming it for I/O failures (safetensors
    reports a full disk as its own error, tokenizers as a plain Exception "... (os error 28)"), `e` itself for
    anything else or when already named."""
    if isinstance(e, WriteError):
        return e
    if not isinstance(e, OSError | SafetensorError) and not (type(e) is Exception and _OS_ERROR.search(str(e))):
        return e
    why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
    err = _named(path, why, _errno(e), verb)
    err.__cause__ = e
    return err


def _renamed(e: BaseException, tmp: Path, dest: Path, default: Path) -> BaseException:
    """_write_error for an error raised while filling the temporary `tmp` that becomes `dest`: one that names a
    path under `tmp` (a nested atomic write, an open() of a file in it) names the same path under `dest`, which
    is the one the user will look for; anything else names `default`."""
    named = e.path if isinstance(e, WriteError) else getattr(e, "filename", None) if isinstance(e, OSError) \
        else None
    try:
        rel = Path(named).resolve().relative_to(tmp.resolve()) if named is not None else None
    except (ValueError, OSError, TypeError):
        rel = None
    if rel is None:
        return _write_error(default, e)
    where = dest / rel
    if isinstance(e, WriteError):
        err = _named(where, e.why, e.code, e.verb)
        err.__cause__ = e.__cause__
        return err
    return _write_error(where, e)


def make_dirs(path) -> Path:
    """path.mkdir(parents=True, exist_ok=True), failing with the one-line WriteError that names the directory
    and what to do (a file in the way, a read-only or full disk) rather than a bare OSError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(path, e, "cannot create this directory") from None
    return path


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk: on a network or FUSE filesystem a full disk or an I/O error can surface only
    here, and Rust writers (safetensors, tokenizers) ignore close()'s error, so without it a truncated file
    could be renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync_file every file under root."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fsync_file(Path(dirpath) / f)


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
    it is flushed to disk (fsync_file), gets open()'s permissions and replaces `path`, on error it is removed and
    `path` is untouched."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
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
    """Yield a temporary sibling directory to fill; on success its files are flushed to disk (fsync_tree) and it
    replaces `path` as a whole, on error it is removed and `path` is untouched.

    tmp_name: a fixed name for the temporary (a crash's leftover of that name is removed first), for callers
      whose cleanup looks for it by name; by default a unique `.NAME.tmp-XXXXXXXX`, so two writers never share one.
    fsync: also flush the temporary's entries before the rename and the parent's after it (checkpoints: a power
      cut must not leave a step-N whose files are missing).

    An existing `path` is moved aside to `<tmp>.old` first and deleted only once the new one is in place, so at
    every moment one complete version exists under one of the two names. An error about a file in the temporary
    (a nested atomic write) names that file under `path`.
    """
    path = Path(path).resolve()  # a relative "." or "x/.." has no usable name to derive siblings from
    make_dirs(path.parent)
    try:
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
        fsync_tree(tmp)
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
        raise _renamed(e, tmp, path, path)


def staging_dir(path) -> Path:
    """Where staged_files(path) puts its temporary, and so where check_writable(path) probes: inside `path` when
    it exists (a writable directory may sit in a read-only parent: a mount point, a container volume), else its
    parent, where `path` will be created. Either way the renames into `path` stay on one filesystem."""
    path = Path(path).resolve()
    return path if path.is_dir() else path.parent


def check_writable(path, flag: str = "--out") -> None:
    """Fail now, naming the flag, when `path` (a directory to create or fill) could not be written: before a long
    job rather than after it. Creates nothing: a temporary file is made and removed where staged_files(path) will
    stage (staging_dir), or in the nearest existing directory above it when that is still to be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(f"{flag} {path} exists and is not a directory; pick another {flag}")
    probe = staging_dir(path)
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
    """Yield a temporary directory for a command's output files; on success each is flushed to disk and moved
    into the directory `path` (created when missing; files already there under other names stay), on error while
    they are written the temporary is removed and `path` is as it was (only the renames, which write no data,
    come after). For outputs that share a directory with others (an evaluation's report beside what the user
    keeps there), where atomic_dir's swap of the whole directory would be wrong.

    The temporary, `.NAME.tmp-XXXXXXXX`, is made in staging_dir(path): inside `path` when it exists, beside it
    when it does not; check_writable(path) probes the same place. An error about a file in it names that file
    under `path`."""
    path = Path(path).resolve()
    make_dirs(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=staging_dir(path)))
    except OSError as e:
        raise _write_error(path, e)
    try:
        yield tmp
        share_like_umask(tmp)
        fsync_tree(tmp)
        path.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, path / f.name)
        tmp.rmdir()
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _renamed(e, tmp, path, path)
