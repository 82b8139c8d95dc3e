"""Where a sweep keeps what it writes: one location, a local folder or a bucket.

`StorageLocation` is computed once from `storage.path` and every writer goes through it: the
spec, Tune's state and the trials' checkpoints (Ray takes the same URI), the data cache, the
results, the report and the default MLflow store's artifacts. A URI is never put through
`pathlib.Path`, which would turn `s3://bucket/x` into the local folder `s3:/bucket/x`.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from simpo_sweep.service.errors import SweepError
from simpo_sweep.spec.loading import parse_spec
from simpo_sweep.spec.models import SweepSpec
from simpo_sweep.tracking.mlflow_runs import default_tracking_uri

SPEC_FILE = "spec.yaml"  # in every sweep's folder: what `resume` and `report` read
# What stays on this machine when storage is a bucket: the tokenising cache (its result is
# copied to the bucket) and the embedded MLflow store (its artifacts go to the bucket).
LOCAL_HOME = Path.home() / ".cache" / "simpo-sweep"

# Schemes pyarrow (and so Ray Tune) opens as filesystems; each maps to one pyarrow filesystem.
REMOTE_SCHEMES = frozenset({"s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs"})


@dataclass(frozen=True)
class StorageLocation:
    """A folder on a local disk (an absolute path) or in a bucket (a URI), with its filesystem.

    `uri` is what Ray, MLflow and the user see; `filesystem` and `fs_path` are how this
    process reads and writes there.
    """

    uri: str
    _filesystem: list[pafs.FileSystem] = field(
        default_factory=list, compare=False, repr=False
    )  # opened on first use, then kept (a bucket's client resolves its region once)

    @classmethod
    def parse(cls, path: str) -> StorageLocation:
        """`s3://b/x` stays a URI; `file:///x` and `~/x` and relative paths become absolute."""
        scheme = urlparse(path).scheme
        if scheme in REMOTE_SCHEMES:
            return cls(path.rstrip("/"))
        if scheme == "file":
            return cls(str(Path(unquote(urlparse(path).path)).resolve()))
        if "://" in path:
            raise SweepError(
                f"storage.path {path!r}: unsupported scheme {scheme!r}; use a local path, "
                f"file://, or one of {', '.join(sorted(REMOTE_SCHEMES))}"
            )
        return cls(str(Path(path).expanduser().resolve()))

    @property
    def is_remote(self) -> bool:
        return urlparse(self.uri).scheme in REMOTE_SCHEMES

    @property
    def local_path(self) -> Path | None:
        """The folder on this machine, or None for a bucket."""
        return None if self.is_remote else Path(self.uri)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> StorageLocation:
        return StorageLocation(self.uri.rstrip("/").rsplit("/", 1)[0])

    def __truediv__(self, part: str) -> StorageLocation:
        return StorageLocation(f"{self.uri.rstrip('/')}/{part.strip('/')}")

    def __str__(self) -> str:
        return self.uri

    def __getstate__(self) -> dict[str, object]:
        # Ray pickles plans holding locations; the filesystem is reopened where they land.
        return {"uri": self.uri, "_filesystem": []}

    def __setstate__(self, state: dict[str, object]) -> None:
        object.__setattr__(self, "uri", state["uri"])
        object.__setattr__(self, "_filesystem", [])

    @property
    def filesystem(self) -> pafs.FileSystem:
        if not self._filesystem:
            if self.is_remote:
                filesystem, _ = pafs.FileSystem.from_uri(self.uri)
            else:
                filesystem = pafs.LocalFileSystem()
            self._filesystem.append(filesystem)
        return self._filesystem[0]

    @property
    def fs_path(self) -> str:
        """The path inside `filesystem` (a bucket URI without its scheme)."""
        if not self.is_remote:
            return self.uri
        parsed = urlparse(self.uri)
        return f"{parsed.netloc}{parsed.path}".rstrip("/")

    # ---- reading and writing ------------------------------------------------------------------

    def mkdirs(self) -> None:
        if self.is_remote:
            # Buckets have no folders; a prefix exists as soon as an object is under it.
            return
        self.filesystem.create_dir(self.fs_path, recursive=True)

    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.fs_path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.filesystem.get_file_info(self.fs_path).type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.filesystem.get_file_info(self.fs_path).type == pafs.FileType.Directory

    def write_bytes(self, data: bytes) -> None:
        """Whole or not at all: written beside the target, then moved over it (locally), or
        one object upload (buckets, where an object appears only once complete)."""
        if self.is_remote:
            with self.filesystem.open_output_stream(self.fs_path) as stream:
                stream.write(data)
            return
        target = Path(self.uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=f".{target.name}.", delete=False
        ) as handle:
            handle.write(data)
        os.replace(handle.name, target)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.fs_path) as stream:
            return bytes(stream.read())

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def children(self) -> list[StorageLocation]:
        """What is directly inside this folder (empty when it does not exist)."""
        if not self.exists():
            return []
        selector = pafs.FileSelector(self.fs_path, recursive=False)
        prefix = self.uri.rstrip("/")
        return [
            StorageLocation(f"{prefix}/{info.base_name}")
            for info in self.filesystem.get_file_info(selector)
        ]

    def size_bytes(self) -> int:
        """The bytes of every file at or under this location (0 when nothing is there)."""
        info = self.filesystem.get_file_info(self.fs_path)
        if info.type == pafs.FileType.File:
            return int(info.size or 0)
        if info.type != pafs.FileType.Directory:
            return 0
        selector = pafs.FileSelector(self.fs_path, recursive=True)
        return sum(
            int(entry.size or 0)
            for entry in self.filesystem.get_file_info(selector)
            if entry.type == pafs.FileType.File
        )

    def remove(self) -> None:
        """Delete this file or folder with everything under it (nothing there: nothing to do)."""
        info = self.filesystem.get_file_info(self.fs_path)
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.fs_path)
        elif info.type == pafs.FileType.File:
            self.filesystem.delete_file(self.fs_path)

    def upload_folder(self, folder: Path) -> None:
        """Copy a local folder's files here (this location becomes the folder's copy)."""
        pafs.copy_files(
            str(folder.resolve()),
            self.fs_path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.filesystem,
        )

    def download_folder(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            self.fs_path,
            str(folder.resolve()),
            source_filesystem=self.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )

    def save_figure(self, figure: object, name: str) -> StorageLocation:
        """A matplotlib figure as PNG at `self / name`."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)  # type: ignore[attr-defined]
        target = self / name
        target.write_bytes(buffer.getvalue())
        return target


# ---- a sweep's places ---------------------------------------------------------------------


def storage_location(spec: SweepSpec) -> StorageLocation:
    """The sweep's storage root, computed once from the spec: an absolute path or a URI."""
    return StorageLocation.parse(spec.storage.path)


def tracking_uri(spec: SweepSpec) -> str | None:
    if not spec.tracking.enabled:
        return None
    explicit = spec.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        return explicit
    local = storage_location(spec).local_path
    return default_tracking_uri(local if local is not None else LOCAL_HOME / "mlflow")


def artifact_location(spec: SweepSpec) -> str | None:
    """Where the embedded store keeps artifacts when storage is a bucket: in the bucket.
    None: the store's own rule (beside mlflow.db; a server decides for itself)."""
    storage = storage_location(spec)
    explicit = spec.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if storage.is_remote and not explicit:
        return (storage / "mlartifacts").uri
    return None


def load_sweep_spec(sweep_dir: StorageLocation) -> SweepSpec:
    """The spec a sweep ran with; its storage is where the sweep was found, whatever the
    current folder (the spec may hold a relative path)."""
    spec_file = sweep_dir / SPEC_FILE
    spec = parse_spec(spec_file.read_text(), spec_file.uri)
    storage = spec.storage.model_copy(update={"path": sweep_dir.parent.uri})
    return spec.model_copy(update={"storage": storage})


def find_sweep_dir(sweep: str, storage_path: str = "simpo_runs") -> StorageLocation:
    """A sweep named by its folder or URI, or by its id under the default storage path."""
    candidates = [StorageLocation.parse(sweep)]
    if "://" not in sweep:
        candidates.append(StorageLocation.parse(storage_path) / sweep)
    for candidate in candidates:
        if (candidate / SPEC_FILE).is_file():
            return candidate
    raise SweepError(
        f"no sweep at {sweep!r}: give the sweep's folder or URI (it holds {SPEC_FILE}) "
        f"or its id under {storage_path}/"
    )
