"""Writing and reading result files from typed models: one atomic write, one reader per format.

    write_json(path, summary)                   # a pydantic model -> pretty JSON, atomically
    summary = read_json(path, RunSummary)       # -> the model, or UserError naming the file
    write_csv(path, rows, RowModel)             # columns are the model's fields, in order
    rows = read_csv(path, RowModel)
    append_jsonl(path, record); records = read_jsonl(path, MetricRecord)

Every write goes through a temporary file in the same folder, fsync and os.replace, so a reader (or
a crash) never sees half a file. A disk that fills up mid-write raises `UserError` naming the file
and the folder, and the previous version of the file is left as it was. Pydantic writes a float that
is not finite as JSON null, so models declare `float | None` wherever a value may be missing.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from transformer_comparison.errors import UserError

Model = TypeVar("Model", bound=BaseModel)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file


def write_bytes_atomic(path: str | os.PathLike[str], write: Callable[[io.BufferedWriter], Any]) -> None:
    """Write through a temporary file beside `path` (fsynced), then os.replace it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(stream.fileno(), _FILE_MODE)  # mkstemp makes files private (0600); results are ordinary files
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise UserError(f"the disk is full: could not write {path} (in {path.parent}); "
                            "the previous version of the file is intact") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, lambda stream: stream.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike[str], model: BaseModel) -> None:
    """The model as indented JSON, atomically."""
    write_text_atomic(path, model.model_dump_json(indent=2) + "\n")


def read_json(path: str | os.PathLike[str], model: type[Model]) -> Model:
    """Read and validate a JSON file into `model`; UserError (one line, naming the file) otherwise."""
    path = Path(path)
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    except ValidationError as error:
        raise UserError(f"{path} is not a valid {model.__name__}: {_first_problem(error)}") from None


def write_csv(path: str | os.PathLike[str], rows: Iterable[BaseModel], model: type[BaseModel]) -> None:
    """One row per model instance; the columns are `model`'s fields in declaration order. None is an
    empty cell, floats keep full precision (repr)."""
    columns = [field.alias or name for name, field in model.model_fields.items()]  # alias: a column named "pass"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = row.model_dump(mode="json", by_alias=True)
        writer.writerow(["" if values[c] is None else _cell(values[c]) for c in columns])
    write_text_atomic(path, buffer.getvalue())


def read_csv(path: str | os.PathLike[str], model: type[Model]) -> list[Model]:
    """Read a CSV written by `write_csv` (empty cells are None); UserError naming the file and row."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    rows = []
    for number, record in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        known = {field.alias or name for name, field in model.model_fields.items()}
        values = {key: (None if value == "" else value) for key, value in record.items() if key in known}
        try:
            rows.append(model.model_validate(values))
        except ValidationError as error:
            raise UserError(f"{path} line {number}: {_first_problem(error)}") from None
    return rows


def append_jsonl(path: str | os.PathLike[str], record: BaseModel) -> None:
    """Append one record as a JSON line (flushed and fsynced, so a crash tears at most this line)."""
    path = Path(path)
    try:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(record.model_dump_json() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise UserError(f"the disk is full: could not append to {path} (in {path.parent}); at most its last "
                            "line is incomplete, which a resume drops") from None
        raise


def read_jsonl(path: str | os.PathLike[str], model: type[Model], drop_torn_tail: bool = False) -> tuple[list[Model], bool]:
    """The records of a JSON-lines file, and whether a torn final line was dropped.

    A final line that is not valid JSON (a crash mid-append) is dropped when `drop_torn_tail`;
    any other bad line is a UserError naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return [], False
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    complete, tail = lines[:-1], lines[-1]  # text after the last newline was never finished
    records: list[Model] = []
    torn = bool(tail.strip())
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            records.append(model.model_validate_json(line))
        except ValidationError as error:
            if number == len(complete) and drop_torn_tail and not tail.strip():
                torn = True
                break
            raise UserError(f"{path} line {number}: {_first_problem(error)}") from None
    if torn and not drop_torn_tail:
        raise UserError(f"{path}: the last line is incomplete (a crash while writing it)")
    return records, torn


def write_jsonl(path: str | os.PathLike[str], records: Sequence[BaseModel]) -> None:
    """Replace a JSON-lines file with these records, atomically."""
    write_text_atomic(path, "".join(record.model_dump_json() + "\n" for record in records))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _first_problem(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "value"
    return f"{where}: {first['msg']}"
