"""File reading shared by the loaders: every failure becomes a one-line DataError naming the file (and line)."""
import csv
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from data.example import DataError

csv.field_size_limit(sys.maxsize)  # CUAD cells hold whole clause lists


def open_text(path: Path, what: str):
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found; check the dataset directory") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror}); check permissions") from None


def read_failed(path: Path, what: str, e: OSError) -> DataError:
    """The error for a file that opened but could not be read to its end (an I/O error, a vanished mount)."""
    return DataError(f"{path}: reading {what} failed ({e.strerror or e}); check the file and the disk it is on")


def not_utf8(path: Path, what: str) -> DataError:
    """The error for a file that is not UTF-8, naming the first bad line (the decoder only knows a buffer
    offset)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"{path}:{n}: {what} is not UTF-8 (byte {e.start + 1} of the line); "
                                 "re-save it as UTF-8")
    return DataError(f"{path}: {what} is not UTF-8; re-save it as UTF-8")


def read_text(path: Path, what: str) -> str:
    try:
        with open_text(path, what) as f:
            return f.read()
    except UnicodeDecodeError:
        raise not_utf8(path, what) from None
    except OSError as e:
        raise read_failed(path, what, e) from None


def read_jsonl(path: Path, what: str):
    """Yield (line_number, object) for each non-blank line; a line that is not a JSON object is an error."""
    with open_text(path, what) as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); "
                                    "each line must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                try:  # valid JSON may still escape half a UTF-16 pair ("\ud800"), which no tokenizer takes
                    json.dumps(obj, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError as e:
                    raise DataError(f"{path}:{n}: holds an unpaired surrogate escape ({e.object[e.start]!a}); "
                                    "write the character itself, or remove it") from None
                yield n, obj
        except UnicodeDecodeError:
            raise not_utf8(path, what) from None
        except OSError as e:
            raise read_failed(path, what, e) from None


def read_tsv(path: Path, what: str, header: list[str] | None = None):
    """Yield (line_number, row) of a tab-separated file read with csv (ACORD quotes ids holding double quotes)."""
    with open_text(path, what) as f:
        rows = csv.reader(f, delimiter="\t")
        with _table_errors(path, what, "TSV", rows):
            first = next(rows, None)
            if first is None:
                raise DataError(f"{path}: {what} is empty")
            if header is not None and [c.strip() for c in first] != header:
                raise DataError(f"{path}:1: expected header {'<TAB>'.join(header)!r}, got {'<TAB>'.join(first)!r}")
            for row in rows:
                if row and any(c.strip() for c in row):
                    yield rows.line_num, row


def read_csv(path: Path, what: str):
    """Yield (line_number, row) of a CSV file, its header included; blank lines are skipped."""
    with open_text(path, what) as f:
        rows = csv.reader(f, strict=True)  # a quote left open is an error, not the rest of the file in one cell
        with _table_errors(path, what, "CSV", rows):
            for row in rows:
                if row:
                    yield rows.line_num, row


@contextmanager
def _table_errors(path: Path, what: str, kind: str, rows):
    """A table reader's failures as one-line DataErrors naming the file and, where known, the line."""
    try:
        yield
    except csv.Error as e:
        raise DataError(f"{path}:{rows.line_num}: malformed {kind} ({e})") from None
    except UnicodeDecodeError:
        raise not_utf8(path, what) from None
    except OSError as e:
        raise read_failed(path, what, e) from None
