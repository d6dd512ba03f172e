"""Where samples come from: a data set folder (``metadata.jsonl``) or WebDataset tar shards.

A data set folder follows the Hugging Face imagefolder / audiofolder convention: one JSON
object a line in ``metadata.jsonl``, ``file_name`` naming the image relative to that file,
other file columns ending in ``_file`` or ``_file_name`` (``audio_file``, ``video_file``...),
plus any other columns (``text``, ``label``, ``split``...). ``metadata.jsonl`` files in
sub-folders are read too; a sub-folder named like a split (``train/``, ``test/``...) gives its
rows that split unless they name one.

Both sources yield :class:`RawSample`: the row and a way to read its files' bytes. Problems
found here (a line of invalid JSON, a shard that cannot be read) go to a :class:`SkipLog`.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from polymodal.errors import InputError

log = logging.getLogger("polymodal.data")
METADATA = "metadata.jsonl"
SPLIT_FOLDERS = ("train", "val", "validation", "test", "test_novel", "dev")


def is_file_column(column: str) -> bool:
    return column == "file_name" or column.endswith(("_file", "_file_name"))


@dataclass
class BadSample:
    source: str  # the file, shard member or "metadata.jsonl line N"
    reason: str


class SkipLog:
    """Bad samples skipped while streaming: counted, kept (up to ``keep``) and logged.

    ``counts`` maps a kind ("bad", "missing") to how many; ``bad`` holds the first ``keep``
    as :class:`BadSample`. After :meth:`share`, DataLoader worker processes report into the
    same log (through a multiprocessing manager) instead of into their own copies.
    """

    def __init__(self, keep: int = 1000):
        self.keep = keep
        self.bad: list[BadSample] = []
        self._counts: dict[str, int] = {}
        self._lock = None
        self._manager = None

    def share(self) -> SkipLog:
        """Make the log shared with worker processes (keeps what it already holds)."""
        if self._manager is None:
            import multiprocessing as mp

            self._manager = mp.Manager()
            self.bad = self._manager.list(self.bad)
            self._counts = self._manager.dict(self._counts)
            self._lock = self._manager.Lock()
        return self

    def __getstate__(self):
        return {**self.__dict__, "_manager": None}  # proxies travel to workers; the manager stays

    def add(self, source: str, reason: str, kind: str = "bad") -> None:
        if self._lock is not None:
            with self._lock:
                self._record(source, reason, kind)
        else:
            self._record(source, reason, kind)
        if kind == "bad":
            log.warning("skipped %s: %s", source, reason)

    def _record(self, source: str, reason: str, kind: str) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        if len(self.bad) < self.keep:
            self.bad.append(BadSample(source, reason))

    @property
    def counts(self) -> Counter:
        return Counter(dict(self._counts))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        parts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items()))
        return f"{self.total} samples skipped ({parts})"


@dataclass
class RawSample:
    row: dict
    origin: str  # where the row came from, for error messages
    files: dict[str, bytes] | None = None  # column -> bytes, for shards
    root: Path | None = None  # folder that relative file paths start from, for folders

    def file_name(self, column: str) -> str:
        value = self.row[column]
        if self.files is not None:
            return f"{self.origin}:{column}"
        return str(self.root / value)

    def read(self, column: str) -> bytes:
        """The bytes of the file named in ``column``; :class:`InputError` if it cannot be read."""
        if column not in self.row or self.row[column] in (None, ""):
            raise InputError(self.origin, f"no {column!r} field")
        if self.files is not None:
            if column not in self.files:
                raise InputError(self.file_name(column), "file missing from the shard")
            return self.files[column]
        path = self.root / str(self.row[column])
        try:
            return path.read_bytes()
        except FileNotFoundError as e:
            raise InputError(path, "file not found") from e
        except OSError as e:
            raise InputError(path, f"cannot read file: {e}") from e


def find_metadata(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "data set folder not found")
    found = sorted(directory.rglob(METADATA))
    if not found:
        raise InputError(directory, f"no {METADATA} in this folder or below it")
    return found


def iter_folder(directory: str | os.PathLike, skips: SkipLog) -> Iterator[RawSample]:
    """Rows of every ``metadata.jsonl`` under ``directory``; bad lines are skipped and logged."""
    directory = Path(directory)
    for meta in find_metadata(directory):
        folder_split = meta.parent.name if meta.parent != directory and meta.parent.name in SPLIT_FOLDERS else None
        name = str(meta.relative_to(directory.parent)) if meta.is_relative_to(directory.parent) else str(meta)
        with open(meta, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                origin = f"{name} line {number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    skips.add(origin, f"invalid JSON: {e.msg} at column {e.colno}")
                    continue
                if not isinstance(row, dict):
                    skips.add(origin, f"expected a JSON object, got {type(row).__name__}")
                    continue
                if folder_split and "split" not in row:
                    row["split"] = folder_split
                yield RawSample(row=row, origin=origin, root=meta.parent)


def shard_paths(location: str | os.PathLike) -> list[Path]:
    path = Path(location)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise InputError(path, "no .tar shards in this folder")
        return shards
    if path.is_file() and path.suffix == ".tar":
        return [path]
    raise InputError(path, "not a data set folder, a shard folder or a .tar shard")


def iter_shards(location: str | os.PathLike, skips: SkipLog, shards: list[Path] | None = None) -> Iterator[RawSample]:
    """Samples of WebDataset shards: members ``KEY.json`` (the row) and ``KEY.COLUMN.EXT`` (files).

    Members of one sample are consecutive in a shard, as WebDataset writes them.
    """
    for shard in shards or shard_paths(location):
        try:
            with tarfile.open(shard, "r|*") as tar:
                current: str | None = None
                members: dict[str, bytes] = {}
                for info in tar:
                    if not info.isfile():
                        continue
                    key, _, ext = info.name.partition(".")
                    if key != current and current is not None:
                        yield from _shard_sample(shard, current, members, skips)
                        members = {}
                    current = key
                    members[ext] = tar.extractfile(info).read()
                if current is not None:
                    yield from _shard_sample(shard, current, members, skips)
        except (tarfile.TarError, OSError, EOFError) as e:
            skips.add(str(shard), f"unreadable shard (rest of it skipped): {e}")


def _shard_sample(shard: Path, key: str, members: dict[str, bytes], skips: SkipLog) -> Iterator[RawSample]:
    origin = f"{shard.name}:{key}"
    if "json" not in members:
        skips.add(origin, "sample has no .json member")
        return
    try:
        row = json.loads(members.pop("json"))
    except json.JSONDecodeError as e:
        skips.add(origin, f"invalid JSON: {e.msg}")
        return
    files = {ext.rsplit(".", 1)[0]: data for ext, data in members.items()}
    yield RawSample(row=row, origin=origin, files=files)


def iter_source(location: str | os.PathLike, skips: SkipLog) -> Iterator[RawSample]:
    """A data set folder, a folder of shards, or one shard."""
    path = Path(location)
    if path.is_dir() and any(path.rglob(METADATA)):
        return iter_folder(path, skips)
    return iter_shards(path, skips)


def write_shards(
    directory: str | os.PathLike, out: str | os.PathLike, *, samples_per_shard: int = 1000,
    skips: SkipLog | None = None,
) -> list[Path]:
    """Pack a data set folder into WebDataset shards ``shard-000000.tar``, ... under ``out``.

    Files are copied as they are (no decoding); a row whose file is missing is skipped and
    logged. Shards are byte-for-byte reproducible (fixed member times and owners).
    """
    import webdataset as wds

    skips = skips if skips is not None else SkipLog()
    find_metadata(Path(directory))  # a missing or empty folder fails before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / "shard-%06d.tar")
    seen: set[str] = set()
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0.0) as sink:
        for number, raw in enumerate(iter_folder(Path(directory), skips)):
            key = _safe_key(str(raw.row.get("id", number)), number, seen)
            sample = {"__key__": key, "json": json.dumps(raw.row, sort_keys=True).encode()}
            try:
                for column, value in raw.row.items():
                    if is_file_column(column) and value:
                        sample[f"{column}{Path(str(value)).suffix.lower()}"] = raw.read(column)
            except InputError as e:
                skips.add(e.source, e.problem)
                continue
            sink.write(sample)
        written = [Path(pattern % i) for i in range(sink.shard)]  # a shard opens on its first sample
    return [p for p in written if p.exists()]


def _safe_key(key: str, number: int, seen: set[str]) -> str:
    key = "".join(c if c.isalnum() or c in "-_" else "_" for c in key) or f"{number:08d}"
    if key in seen:
        key = f"{key}_{number}"
    seen.add(key)
    return key

