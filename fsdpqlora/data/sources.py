"""Where rows come from: local files, directories of them, or data sets on the Hugging Face hub.

A source is one split of a data set, read row by row; each row is a dict of fields and says where
it is (`file: row N`), so that any later complaint about it names the file and the row.

Local files are read here, strictly, one row at a time: `.jsonl` (one object per line), `.json` (a
list of objects), `.csv` (a header line, then records), `.parquet`, and `.txt` (the whole file is one
document, field `text`). `datasets`' own json builder was not used for them because it turns a line
that is a JSON list into rows of a made-up `text` column, reports parse errors at row numbers
relative to an internal block, and copies every local file into its Arrow cache first.
Directories are split by file name with `datasets`' rules (train*, test*, validation*/valid*/dev*).
Hub names go through `datasets.load_dataset`, with its cache inside `launch.cache_dir`.

Row numbers count from 1: the line of a .jsonl file, the element of a .json list, the record of a
csv file (header not counted) or of a parquet file.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fsdpqlora import assets
from fsdpqlora.compat import dataset_fingerprint
from fsdpqlora.config import Config
from fsdpqlora.errors import DataError

FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
# Built-in data sets, made offline from Python's own documentation: name -> builder(cache_dir).
BUILT_IN = {"pydoc_qa": assets.pydoc_qa_path, "pydoc_text": assets.pydoc_text_path}


@dataclass(frozen=True)
class Row:
    where: str  # "file.jsonl: row 3", for error messages
    fields: dict


@dataclass(frozen=True)
class Source:
    """One split of a data set: local files (read in order) or a hub data set."""

    name: str  # what messages call it
    files: tuple[Path, ...] = ()
    hub_id: str = ""
    subset: str = ""
    split: str = "train"
    cache_dir: str = ""

    def fingerprint(self) -> str:
        """Changes whenever the rows may have changed: local files by path, size and modification
        time (like make), hub data sets by the fingerprint `datasets` gives its cached copy."""
        if self.hub_id:
            parts = [self.hub_id, self.subset, self.split, dataset_fingerprint(_load_hub(self))]
        else:
            parts = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in self.files]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def rows(self) -> Iterator[Row]:
        if self.hub_id:
            for number, fields in enumerate(_load_hub(self), start=1):
                yield Row(f"{self.name}: row {number}", fields)
            return
        for path in self.files:
            yield from read_file(path)

    def count_hint(self) -> int | None:
        """How many rows, where that is cheap to know (for the progress bar)."""
        if self.hub_id:
            return len(_load_hub(self))
        if all(p.suffix in (".jsonl", ".txt") for p in self.files):
            return sum(_count_lines(p) if p.suffix == ".jsonl" else 1 for p in self.files)
        return None

@functools.lru_cache(maxsize=4)
def _load_hub(source: Source):
    import datasets

    try:
        return datasets.load_dataset(
            source.hub_id,
            source.subset or None,
            split=source.split,
            cache_dir=str(assets.cache_root(source.cache_dir) / "datasets"),
        )
    except Exception as exc:  # datasets raises many types; all mean "could not get it"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(
            f"data.path={source.hub_id!r}: not a local file or directory, and loading it from the hub "
            f"failed ({type(exc).__name__}: {first_line})"
        ) from None


def open_source(cfg: Config, split: str | None = None) -> Source:
    """The source of `split` (data.split when None): a built-in data set, a local file or
    directory, or a hub data set. Raises DataError naming the problem."""
    split = split or cfg.data.split
    path = cfg.data.path
    if not path and cfg.data.name in BUILT_IN:
        if split != "train":
            raise DataError(f"data={cfg.data.name} has only a train split, not {split!r}; hold some out with data.eval_fraction")
        built = BUILT_IN[cfg.data.name](cfg.launch.cache_dir)
        return Source(name=str(built), files=(built,), split=split)
    if not path:
        raise DataError(
            f"data={cfg.data.name} needs data.path=FILE ({', '.join(FILE_TYPES)}), a directory of such files, "
            "or a hub data set name"
        )
    return source_at(path, split, cfg)


def source_at(path: str, split: str, cfg: Config) -> Source:
    local = Path(path).expanduser()
    if local.is_file():
        return Source(name=str(local), files=(_checked_type(local),), split=split)
    if local.is_dir():
        return Source(name=f"{local} [{split}]", files=_split_files(local, split), split=split)
    looks_local = path.startswith((".", "~", "/")) or path.endswith("/") or path.count("/") > 1 or local.suffix in FILE_TYPES
    if looks_local:
        raise DataError(f"data.path={path!r}: no such file or directory")
    return Source(
        name=f"{path}[{split}]", hub_id=path, subset=cfg.data.subset, split=split, cache_dir=cfg.launch.cache_dir
    )


def _checked_type(path: Path) -> Path:
    if path.suffix not in FILE_TYPES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'}; use {', '.join(FILE_TYPES)}")
    return path


def _split_files(directory: Path, split: str) -> tuple[Path, ...]:
    """The data files of one split of a directory, named as on the hub (train*, test*, valid*...);
    without such names every file belongs to `train`. READMEs and hidden files are not data."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    empty = DataError(f"data.path={str(directory)!r}: the directory holds no data files ({', '.join(FILE_TYPES)})")
    try:
        patterns = get_data_patterns(str(directory))
    except EmptyDatasetError:
        raise empty from None
    by_split = {
        str(name): [
            f
            for f in sorted(Path(f) for f in files)
            if not any(part.startswith(".") for part in f.relative_to(directory).parts) and f.suffix != ".md" and f.is_file()
        ]
        for name, files in DataFilesDict.from_patterns(patterns, base_path=str(directory)).items()
    }
    if not any(by_split.values()):
        raise empty
    files = by_split.get(split, [])
    if not files:
        found = ", ".join(sorted(name for name, files in by_split.items() if files)) or "none"
        raise DataError(f"{directory}: no data files for split '{split}' (splits found: {found})")
    return tuple(_checked_type(f) for f in files)


def read_file(path: Path) -> Iterator[Row]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt}
    yield from readers[path.suffix](path)


def _read_jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            # A first line that is not JSON text is most often a file of another kind.
            hint = " (is it a JSON-lines file?)" if number == 1 else ""
            line = _utf8(raw, path, number, hint)
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {number} is not valid JSON ({exc.msg} at column {exc.colno}){hint}") from None
            yield Row(f"{path}: row {number}", _object(fields, path, number))


def _read_json(path: Path) -> Iterator[Row]:
    text = _utf8(path.read_bytes(), path, None)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "; one object per line is a .jsonl file" if exc.msg == "Extra data" else ""
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}){hint}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: a .json data file must hold a list of objects, not a {type(rows).__name__}")
    for number, fields in enumerate(rows, start=1):
        yield Row(f"{path}: row {number}", _object(fields, path, number))


def _read_csv(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        try:
            reader = csv.DictReader(text)
            for number, fields in enumerate(reader, start=1):
                if None in fields:  # more values than header names
                    raise DataError(f"{path}: row {number} has {len(reader.fieldnames) + len(fields[None])} values, the header names {len(reader.fieldnames)}")
                yield Row(f"{path}: row {number}", fields)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason}, after row {reader.line_num - 1})") from None
        except csv.Error as exc:
            raise DataError(f"{path}: not a valid csv file (line {reader.line_num}: {exc})") from None


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a parquet file ({str(exc).splitlines()[0]})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for fields in batch.to_pylist():
            number += 1
            yield Row(f"{path}: row {number}", fields)


def _read_txt(path: Path) -> Iterator[Row]:
    yield Row(f"{path}: row 1", {"text": _utf8(path.read_bytes(), path, None)})


def _utf8(raw: bytes, path: Path, row: int | None, hint: str = "") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"row {row} is" if row is not None else "is"
        raise DataError(f"{path}: {where} not UTF-8 text ({exc.reason} at byte {exc.start}){hint}") from None


def _object(fields, path: Path, row: int) -> dict:
    if not isinstance(fields, dict):
        raise DataError(f"{path}: row {row} is not an object but a {type(fields).__name__}")
    return fields


def _count_lines(path: Path) -> int:
    count = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
    return count
