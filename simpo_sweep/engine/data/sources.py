"""Where preference rows come from: a built-in set, a local file, a save_to_disk folder or the hub.

Each source is resolved to what identifies its content (a hash of the local bytes, the hub's
fingerprint) before anything is read, so that a cached tokenisation is found without loading.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.exceptions import DatasetNotFoundError

from simpo_sweep.engine import demo
from simpo_sweep.engine.data.normalize import DataError, DataProblems
from simpo_sweep.spec.models import DataSpec

LOCAL_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


RawRows = Sequence[Mapping[str, Any]]


@dataclass
class ResolvedSource:
    """Where rows come from, what identifies their content, and how to read them."""

    description: str
    identity: dict[str, Any]
    train_rows: RawRows | None = None
    eval_rows: RawRows | None = None
    eval_description: str = ""
    loader: Any = None  # () -> (train rows, eval rows or None); set when loading is deferred
    container: str = "the data set"  # what column errors call the place a column is missing

    def load(self) -> tuple[RawRows, RawRows | None]:
        if self.train_rows is None:
            self.train_rows, self.eval_rows = self.loader()
        assert self.train_rows is not None
        return self.train_rows, self.eval_rows


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_folder(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(_sha256_file(file).encode())
    return digest.hexdigest()


def _is_save_to_disk_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_local_file(path: Path, hf_cache: Path) -> datasets.Dataset:
    builder = LOCAL_FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; "
            f"use one of {', '.join(sorted(LOCAL_FILE_FORMATS))}"
        )
    try:
        loaded = datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=str(hf_cache)
        )
    except Exception as error:  # parser errors of json/csv/parquet readers vary by format
        # pyarrow's JSON reader does not say where the text is broken; the json module does.
        located = _json_syntax_problems(path) if builder == "json" else []
        if located:
            raise DataProblems(located) from error
        raise DataError(f"{path}: cannot be read as {builder}: {error}") from error
    assert isinstance(loaded, datasets.Dataset)
    return loaded


def _load_saved_folder(
    path: Path, split: str, eval_split: str | None
) -> tuple[RawRows, RawRows | None]:
    """(train, eval) of a save_to_disk folder: splits of a DatasetDict, or a single Dataset."""
    loaded = datasets.load_from_disk(str(path))
    if not isinstance(loaded, datasets.DatasetDict):
        if eval_split is not None:
            raise DataError(
                f"{path}: a single saved Dataset has no splits, so eval_split {eval_split!r} "
                "cannot be found; save a DatasetDict or use eval_fraction"
            )
        return loaded, None

    def pick(name: str) -> datasets.Dataset:
        if name not in loaded:
            raise DataError(f"{path}: no split {name!r}; it has {', '.join(sorted(loaded))}")
        return loaded[name]

    return pick(split), pick(eval_split) if eval_split is not None else None


SOURCE_BUILTIN = "builtin"
SOURCE_SAVED = "saved"  # a datasets save_to_disk folder
SOURCE_FILE = "file"
SOURCE_HUB = "hub"


def source_kind(data: DataSpec) -> tuple[str, Path | None]:
    """Which kind of source `data.source` is, and its local path; DataError when a local path
    is missing or unusable."""
    source = data.source
    if demo.is_builtin(source):
        return SOURCE_BUILTIN, None
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            if not _is_save_to_disk_folder(path):
                raise DataError(
                    f"{path}: a folder must be a datasets save_to_disk folder (state.json or "
                    "dataset_dict.json); point at a data file instead"
                )
            return SOURCE_SAVED, path
        return SOURCE_FILE, path
    if source.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_FILE_FORMATS:
        raise DataError(f"data source {source!r}: no such file or folder")
    return SOURCE_HUB, None


def _eval_file(data: DataSpec) -> Path | None:
    """A single file has no named splits: with a file as source, eval_split names a second one."""
    if data.eval_split is None:
        return None
    eval_path = Path(data.eval_split).expanduser()
    if not eval_path.is_file():
        raise DataError(
            f"eval_split {data.eval_split!r}: with a data file as source, eval_split must be "
            "the path of a second data file"
        )
    return eval_path


def resolve_source(data: DataSpec, hf_cache: Path) -> ResolvedSource:
    kind, path = source_kind(data)
    if kind == SOURCE_BUILTIN:
        return _resolve_builtin(data)
    if kind == SOURCE_HUB:
        return _resolve_hub(data, hf_cache)
    assert path is not None
    return _resolve_local(data, path, hf_cache)


def _resolve_builtin(data: DataSpec) -> ResolvedSource:
    if data.eval_split is not None:
        raise DataError(
            f"built-in data set {data.source!r} has a single split; hold out an eval set "
            "with eval_fraction instead of eval_split"
        )
    num_pairs = demo.DEFAULT_DEMO_PAIRS
    try:
        rows = demo.demo_preference_rows(data.source, num_pairs, data.seed)
    except ValueError as error:
        raise DataError(str(error)) from error
    return ResolvedSource(
        description=data.source,
        identity={
            "kind": "builtin",
            "name": data.source,
            "version": demo.BUILTIN_DATASETS_VERSION,
            "num_pairs": num_pairs,
        },
        train_rows=rows,
    )


def _resolve_local(data: DataSpec, path: Path, hf_cache: Path) -> ResolvedSource:
    if path.is_dir():
        identity: dict[str, Any] = {"kind": "saved", "sha256": _sha256_folder(path)}

        def load() -> tuple[RawRows, RawRows | None]:
            return _load_saved_folder(path, data.split, data.eval_split)

        return ResolvedSource(
            description=str(path),
            identity=identity,
            loader=load,
            eval_description=f"{path} split {data.eval_split!r}" if data.eval_split else "",
        )

    identity = {"kind": "file", "suffix": path.suffix.lower(), "sha256": _sha256_file(path)}
    eval_path = _eval_file(data)
    if eval_path is not None:
        identity["eval_sha256"] = _sha256_file(eval_path)
        identity["eval_suffix"] = eval_path.suffix.lower()

    def load_files() -> tuple[RawRows, RawRows | None]:
        train = _load_local_file(path, hf_cache)
        evaluation = _load_local_file(eval_path, hf_cache) if eval_path is not None else None
        return train, evaluation

    return ResolvedSource(
        description=str(path),
        identity=identity,
        loader=load_files,
        eval_description=str(eval_path) if eval_path is not None else "",
        container="the file",
    )


def _resolve_hub(data: DataSpec, hf_cache: Path) -> ResolvedSource:
    def load_split(split: str) -> datasets.Dataset:
        try:
            loaded = datasets.load_dataset(data.source, split=split, cache_dir=str(hf_cache))
        except Exception as error:  # hub, network and builder errors alike
            raise DataError(
                f"data source {data.source!r} split {split!r} cannot be loaded: {error}"
            ) from error
        assert isinstance(loaded, datasets.Dataset)
        return loaded

    train = load_split(data.split)
    evaluation = load_split(data.eval_split) if data.eval_split is not None else None
    # datasets fingerprints a loaded split from its builder config and data files (the hub
    # revision included), so it changes exactly when the content may have.
    identity = {
        "kind": "hub",
        "id": data.source,
        "train_fingerprint": train._fingerprint,
        "eval_fingerprint": evaluation._fingerprint if evaluation is not None else None,
    }
    return ResolvedSource(
        description=f"{data.source} split {data.split!r}",
        identity=identity,
        train_rows=train,
        eval_rows=evaluation,
        eval_description=f"{data.source} split {data.eval_split!r}",
    )


# ---- reading a sample without writing anything (inspect_data) ----------------------------------


class SourceUnavailable(DataError):
    """The source cannot be read from here (a hub data set with no hub access): not a mistake
    in the spec, so inspecting the data notes it and goes on."""


@dataclass(frozen=True)
class SourceSample:
    """The first rows of one source, and the columns and line numbers they came with."""

    description: str
    rows: list[dict[str, Any]]
    columns: list[str]
    total_rows: int | None = None  # when the reader knows it
    lines: list[int | None] | None = None  # the line of each row (JSON Lines, CSV)
    container: str = "the file"  # what column errors call the place the columns are missing


@dataclass(frozen=True)
class SampledSource:
    train: SourceSample
    eval: SourceSample | None


def _columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of the rows, in first-seen order (what the datasets loaders make columns of)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def column_names(rows: RawRows) -> list[str]:
    names = getattr(rows, "column_names", None)  # a datasets.Dataset knows its own
    if isinstance(names, list):
        return [str(name) for name in names]
    return _columns_of(rows)


def _json_syntax_problems(path: Path, limit: int = 1) -> list[str]:
    """Where the JSON (or JSON Lines) text of `path` is broken, with line numbers."""
    try:
        _read_json_file(path, 0)
    except DataProblems as problems:
        return problems.problems[:limit]
    except DataError as error:
        return [str(error)]
    return []


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from error


def _read_json_lines(path: Path, limit: int) -> SourceSample:
    """Every line parsed (a broken line far down the file is found now, not when training
    starts), the first `limit` rows kept."""
    rows: list[dict[str, Any]] = []
    lines: list[int | None] = []
    problems: list[str] = []
    total = 0
    with path.open(encoding="utf-8") as stream:
        try:
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as error:
                    problems.append(f"{path} line {number}: {error.msg} (column {error.colno})")
                    continue
                if not isinstance(value, dict):
                    problems.append(
                        f"{path} line {number}: a JSON Lines row must be an object, "
                        f"got {type(value).__name__}"
                    )
                    continue
                total += 1
                if len(rows) < limit:
                    rows.append(value)
                    lines.append(number)
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text ({error})") from error
    if problems:
        raise DataProblems(problems)
    return SourceSample(str(path), rows, _columns_of(rows), total_rows=total, lines=lines)


def _read_json_file(path: Path, limit: int) -> SourceSample:
    if path.suffix.lower() == ".jsonl":
        return _read_json_lines(path, limit)
    try:
        document = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # one object per line in a .json file: JSON Lines
            return _read_json_lines(path, limit)
        raise DataProblems(
            [f"{path} line {error.lineno}: {error.msg} (column {error.colno})"]
        ) from error
    if isinstance(document, dict) and all(isinstance(v, list) for v in document.values()):
        # An object of columns, as datasets' json loader also accepts.
        count = min((len(values) for values in document.values()), default=0)
        document = [{key: document[key][i] for key in document} for i in range(count)]
    if not isinstance(document, list):
        raise DataError(
            f"{path}: a .json file must hold a list of row objects, an object of columns, "
            f"or one object per line (JSON Lines); it holds a {type(document).__name__}"
        )
    problems = [
        f"{path}: row {index} is not an object (got {type(row).__name__})"
        for index, row in enumerate(document)
        if not isinstance(row, dict)
    ]
    if problems:
        raise DataProblems(problems)
    rows = document[:limit]
    return SourceSample(str(path), rows, _columns_of(rows), total_rows=len(document))


def _read_csv(path: Path, limit: int) -> SourceSample:
    rows: list[dict[str, Any]] = []
    lines: list[int | None] = []
    total = 0
    with path.open(encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream)
        try:
            for row in reader:
                total += 1
                if len(rows) < limit:
                    # An empty cell is a missing value, as pandas (datasets' csv loader) reads it.
                    rows.append(
                        {key: (value if value != "" else None) for key, value in row.items()}
                    )
                    lines.append(reader.line_num)
        except csv.Error as error:
            raise DataProblems([f"{path} line {reader.line_num}: {error}"]) from error
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text ({error})") from error
        columns = list(reader.fieldnames or [])
    return SourceSample(str(path), rows, columns, total_rows=total, lines=lines)


def _read_parquet(path: Path, limit: int) -> SourceSample:
    try:
        parquet = pq.ParquetFile(path)
        columns = list(parquet.schema_arrow.names)
        batch = next(parquet.iter_batches(batch_size=max(1, limit)), None)
        total = parquet.metadata.num_rows
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable parquet file: {error}") from error
    rows = batch.to_pylist()[:limit] if batch is not None else []
    return SourceSample(str(path), rows, columns, total_rows=total)


def read_file_sample(path: Path, limit: int) -> SourceSample:
    """The first `limit` rows of a local data file, read with the plain parsers (the json
    module for line numbers), nothing written to any cache."""
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FILE_FORMATS:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; "
            f"use one of {', '.join(sorted(LOCAL_FILE_FORMATS))}"
        )
    if LOCAL_FILE_FORMATS[suffix] == "json":
        return _read_json_file(path, limit)
    if suffix == ".csv":
        return _read_csv(path, limit)
    return _read_parquet(path, limit)


def _dataset_sample(dataset: datasets.Dataset, description: str, limit: int) -> SourceSample:
    count = min(limit, len(dataset))
    rows = [dict(dataset[index]) for index in range(count)]
    return SourceSample(
        description,
        rows,
        list(dataset.column_names),
        total_rows=len(dataset),
        container="the data set",
    )


def hub_is_offline() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set: the hub must not be called at all."""
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag.strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _hub_sample(data: DataSpec, split: str, limit: int) -> SourceSample:
    description = f"{data.source} split {split!r}"
    if hub_is_offline():
        raise SourceUnavailable(
            f"hub data set {description} not checked: the hub is switched off here "
            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
        )
    try:
        streamed = datasets.load_dataset(data.source, split=split, streaming=True)
        rows = [dict(row) for row in itertools.islice(streamed, limit)]
    except DatasetNotFoundError as error:
        raise DataError(f"data source {data.source!r}: {error}") from error
    except ValueError as error:  # an unknown split, a builder that cannot stream
        raise DataError(f"data source {description}: {error}") from error
    except Exception as error:  # network and hub errors: nothing wrong with the spec itself
        raise SourceUnavailable(
            f"hub data set {description} not checked: cannot be reached from here ({error})"
        ) from error
    return SourceSample(description, rows, _columns_of(rows), container="the data set")


def sample_source(data: DataSpec, limit: int) -> SampledSource:
    """The first `limit` rows of the train source (and of a separate eval source), read
    without preparing or caching anything. SourceUnavailable when they cannot be read here."""
    kind, path = source_kind(data)
    if kind == SOURCE_BUILTIN:
        resolved = _resolve_builtin(data)
        train_rows, _ = resolved.load()
        rows = [dict(row) for row in train_rows[:limit]]
        sample = SourceSample(
            data.source,
            rows,
            _columns_of(rows),
            total_rows=len(train_rows),
            container="the data set",
        )
        return SampledSource(sample, None)
    if kind == SOURCE_HUB:
        return SampledSource(
            _hub_sample(data, data.split, limit),
            _hub_sample(data, data.eval_split, limit) if data.eval_split is not None else None,
        )
    assert path is not None
    if kind == SOURCE_SAVED:
        train, evaluation = _load_saved_folder(path, data.split, data.eval_split)
        assert isinstance(train, datasets.Dataset)
        eval_sample = None
        if evaluation is not None:
            assert isinstance(evaluation, datasets.Dataset)
            eval_sample = _dataset_sample(evaluation, f"{path} split {data.eval_split!r}", limit)
        return SampledSource(_dataset_sample(train, str(path), limit), eval_sample)
    eval_path = _eval_file(data)
    return SampledSource(
        read_file_sample(path, limit),
        read_file_sample(eval_path, limit) if eval_path is not None else None,
    )
