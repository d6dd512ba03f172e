"""Where samples come from: a data set folder (``metadata.jsonl``) or WebDataset tar shards.

A data set folder follows the Hugging Face imagefolder / audiofolder convention: one JSON
object a line in ``metadata.jsonl``, ``file_name`` naming the image relative to that file,
other file columns ending in ``_file`` or ``_file_name`` (``audio_file``, ``video_file``...),
plus any other columns (``text``, ``label``, ``split``...). ``metadata.jsonl`` files in
sub-folders are read too; a sub-folder named like a split (``train/``, ``test/``...) gives its
rows that split unless they name one.

Both sources yield :class:`RawSample`: the row and a way to read its files' bytes. Problems
found here (a line of invalid JSON, a shard that cannot be read) go to a :class:`SkipLog`.

Everything here is read from strangers, so nothing is read before it is checked:

- A data set folder is a boundary. A path column must resolve (symbolic links included) to a
  file inside the folder; ``..``, absolute paths and links that lead elsewhere are skipped with
  that reason unless the user opts in (``allow_outside_paths``, the recipe's
  ``data.allow_outside_paths``). Shards are never written from files outside their folder.
- A file must be a regular file (``os.stat`` first: a FIFO is never opened, a device never read)
  of at most ``max_file_bytes`` (the recipe's ``data.max_file_mb``).
- A metadata line is at most :data:`MAX_LINE_BYTES` (longer ones are passed over unread), UTF-8,
  strict JSON (no ``NaN`` / ``Infinity``) nested at most :data:`MAX_ROW_DEPTH` deep, with a
  string ``split``.
- A shard member's size is checked from its tar header before it is read, and a compressed
  shard is decompressed as a stream that may not grow past :data:`MAX_SHARD_EXPANSION` times its
  size (a gzip bomb ends its shard, not the run).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import math
import os
import stat
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from polymodal.errors import InputError

log = logging.getLogger("polymodal.data")
METADATA = "metadata.jsonl"
SPLIT_FOLDERS = ("train", "val", "validation", "test", "test_novel", "dev")

DEFAULT_MAX_FILE_BYTES = 512 * 2**20  # one file (or a shard sample's members together) read into memory
MAX_LINE_BYTES = 2**20  # a metadata row longer than this is skipped without being parsed
MAX_ROW_DEPTH = 32  # rows of the shapes world nest 3 deep; deeper rows are skipped
MAX_SHARD_EXPANSION = 100  # a compressed shard may decompress to this many times its size ...
MIN_SHARD_EXPANSION_BYTES = 64 * 2**20  # ... and always to this much (small shards of tiny members)
MAX_MEMBERS_PER_SAMPLE = 64
MAX_TAR_HEADER_BYTES = 2**20  # tarfile reads pax and GNU long-name headers whole
OUTSIDE_HINT = "set data.allow_outside_paths: true (or --allow-outside-paths) to allow files elsewhere"


def is_file_column(column: str) -> bool:
    return column == "file_name" or column.endswith(("_file", "_file_name"))


@dataclass
class BadSample:
    source: str  # the file, shard member or "metadata.jsonl line N"
    reason: str
    kind: str = "bad"  # bad | missing


class SkipLog:
    """Bad samples skipped while streaming: counted, kept (up to ``keep``) and logged.

    ``counts`` maps a kind ("bad", "missing") to how many; ``bad`` holds the first ``keep``
    as :class:`BadSample`. After :meth:`share`, DataLoader worker processes report into the
    same log (through a multiprocessing manager) instead of into their own copies.
    """

    def __init__(self, keep: int = 1000, quiet: bool = False):
        self.keep = keep
        self.quiet = quiet  # count and keep, but log nothing (a trial pass; see replay)
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
        if kind == "bad" and not self.quiet:
            log.warning("skipped %s: %s", source, reason)

    def _record(self, source: str, reason: str, kind: str) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        if len(self.bad) < self.keep:
            self.bad.append(BadSample(source, reason, kind))

    def replay(self, into: SkipLog) -> None:
        """Add what this log holds to ``into`` (logged there), counts beyond ``keep`` included."""
        for b in list(self.bad):
            into.add(b.source, b.reason, b.kind)
        kept = Counter(b.kind for b in self.bad)
        for kind, n in self.counts.items():
            if n > kept[kind]:
                into._counts[kind] = into._counts.get(kind, 0) + n - kept[kind]

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


# ---- reading a file only once it is known to be a regular file of bounded size ------------------


def _kind_of(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def check_regular_file(path: str | os.PathLike, max_bytes: int | None, name: object = None) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed), refusing anything but a regular file of at most
    ``max_bytes``: a FIFO would block the run forever, ``/dev/zero`` never ends."""
    name = path if name is None else name
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise InputError(name, "file not found") from e
    except OSError as e:
        raise InputError(name, f"cannot read file: {e.strerror or e}") from e
    except ValueError as e:  # a NUL character in the path
        raise InputError(name, f"invalid file path: {e}") from e
    if not stat.S_ISREG(info.st_mode):
        raise InputError(name, f"{_kind_of(info.st_mode)}, not a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise InputError(name, f"file of {info.st_size:,} bytes exceeds the limit of {max_bytes:,} "
                               "(raise data.max_file_mb to accept it)")
    return info


def open_regular_file(path: str | os.PathLike, name: object = None) -> BinaryIO:
    """Open ``path`` for reading after :func:`check_regular_file`; opened without blocking and
    checked again, so a file swapped for a FIFO in between cannot hang the run."""
    name = path if name is None else name
    check_regular_file(path, None, name)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise InputError(name, f"cannot read file: {e.strerror or e}") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InputError(name, f"{_kind_of(mode)}, not a regular file")
    return open(fd, "rb")


def read_regular_file(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_FILE_BYTES, name: object = None) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; :class:`InputError` naming it otherwise."""
    name = path if name is None else name
    check_regular_file(path, max_bytes, name)
    try:
        with open_regular_file(path, name) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(name, f"cannot read file: {e.strerror or e}") from e
    if len(data) > max_bytes:  # it grew after the check
        raise InputError(name, f"file exceeds the limit of {max_bytes:,} bytes (raise data.max_file_mb to accept it)")
    return data


def resolve_file(value: object, root: Path, boundary: Path | None, *, field: str) -> Path:
    """The file a row's path column names, relative to ``root``; with a ``boundary`` (the data set
    folder, resolved) it must lead inside it once ``..`` and every link are resolved.

    ``field`` names the row and column for a value that is not a path at all.
    """
    if not isinstance(value, str):
        raise InputError(field, f"expected a file path (a string), got {type(value).__name__}")
    if "\x00" in value:
        raise InputError(field, "file path contains a NUL character")
    path = root / value
    if boundary is None:
        return path
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise InputError(path, f"cannot resolve the path: {e}") from e
    if not resolved.is_relative_to(boundary):
        how = ("an absolute path" if Path(value).is_absolute() else
               "'..' leads" if ".." in Path(value).parts else "a symbolic link leads")
        raise InputError(path, f"{how} outside the data set folder {boundary}, to {resolved}; {OUTSIDE_HINT}")
    return resolved


# ---- metadata rows -------------------------------------------------------------------------------


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _depth(value: object) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return deepest


def parse_row(line: bytes, origin: str) -> dict:
    """One metadata row (a JSON object a line) -> dict; :class:`InputError` naming ``origin``
    (the line) and the problem: not UTF-8, invalid or non-standard JSON, too deep, not an object,
    a ``split`` or ``id`` of the wrong type."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(origin, f"not UTF-8 text (byte {e.start + 1} of the line)") from e
    try:
        row = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError as e:
        raise InputError(origin, "invalid JSON: nested too deeply") from e
    except json.JSONDecodeError as e:
        raise InputError(origin, f"invalid JSON: {e.msg} (column {e.colno})") from e
    except ValueError as e:  # NaN, Infinity, 1e999, an integer of too many digits
        raise InputError(origin, f"invalid JSON: {e}") from e
    if not isinstance(row, dict):
        raise InputError(origin, f"expected a JSON object, got {type(row).__name__}")
    if _depth(row) > MAX_ROW_DEPTH:
        raise InputError(origin, f"JSON nested more than {MAX_ROW_DEPTH} deep")
    split = row.get("split")
    if split is not None and not isinstance(split, str):
        raise InputError(origin, f"field 'split': expected a string, got {type(split).__name__}")
    key = row.get("id")
    if key is not None and (isinstance(key, bool) or not isinstance(key, str | int)):
        raise InputError(origin, f"field 'id': expected a string or a whole number, got {type(key).__name__}")
    return row


def _lines(f: BinaryIO, name: str, skips: SkipLog) -> Iterator[tuple[int, bytes]]:
    """``(number, line)`` of a metadata file; a line over :data:`MAX_LINE_BYTES` is skipped (and
    logged) without ever being held whole."""
    number = 0
    while line := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_LINE_BYTES)
            skips.add(f"{name} line {number}", f"line longer than {MAX_LINE_BYTES:,} bytes (not read)")
            continue
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):  # a byte-order mark some editors write
            line = line[3:]
        yield number, line


@dataclass
class RawSample:
    row: dict
    origin: str  # where the row came from, for error messages
    files: dict[str, bytes] | None = None  # column -> bytes, for shards
    root: Path | None = None  # folder that relative file paths start from, for folders
    boundary: Path | None = None  # the data set folder (resolved) files must stay inside; None: anywhere
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    def file_name(self, column: str) -> str:
        value = self.row[column]
        if self.files is not None:
            return f"{self.origin}:{column}"
        return str(self.root / str(value))

    def read(self, column: str) -> bytes:
        """The bytes of the file named in ``column``; :class:`InputError` if it cannot be read,
        leads outside the data set folder, is not a regular file or is too large."""
        path = self.check(column)
        if path is None:
            return self.files[column]
        return read_regular_file(path, self.max_file_bytes, name=self.file_name(column))

    def check(self, column: str) -> Path | None:
        """What :meth:`read` checks, without reading: the file's path (None in a shard), or
        :class:`InputError`."""
        value = self.row.get(column)
        if value is None or value == "":
            raise InputError(self.origin, f"no {column!r} field")
        if self.files is not None:
            if column not in self.files:
                raise InputError(self.file_name(column), "file missing from the shard")
            return None
        path = resolve_file(value, self.root, self.boundary, field=f"{self.origin}: field {column!r}")
        check_regular_file(path, self.max_file_bytes, name=self.file_name(column))
        return path


def find_metadata(directory: Path) -> list[Path]:
    """Every ``metadata.jsonl`` in ``directory`` and below; linked folders are not entered (they
    lead elsewhere, and may loop)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "data set folder not found")
    found = sorted(Path(top) / METADATA for top, _, files in os.walk(directory) if METADATA in files)
    if not found:
        raise InputError(directory, f"no {METADATA} in this folder or below it")
    return found


def iter_folder(directory: str | os.PathLike, skips: SkipLog, *, allow_outside_paths: bool = False,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[RawSample]:
    """Rows of every ``metadata.jsonl`` under ``directory``; bad lines are skipped and logged."""
    directory = Path(directory)
    boundary = None if allow_outside_paths else directory.resolve()
    for meta in find_metadata(directory):
        folder_split = meta.parent.name if meta.parent != directory and meta.parent.name in SPLIT_FOLDERS else None
        name = str(meta.relative_to(directory.parent)) if meta.is_relative_to(directory.parent) else str(meta)
        try:
            if boundary is not None:
                resolve_file(str(meta.relative_to(directory)), directory, boundary, field=name)
            handle = open_regular_file(meta, name)
        except InputError as e:
            skips.add(e.source, f"metadata file skipped: {e.problem}")
            continue
        with handle:
            for number, line in _lines(handle, name, skips):
                if not line.strip():
                    continue
                origin = f"{name} line {number}"
                try:
                    row = parse_row(line, origin)
                except InputError as e:
                    skips.add(e.source, e.problem)
                    continue
                if folder_split and "split" not in row:
                    row["split"] = folder_split
                yield RawSample(row=row, origin=origin, root=meta.parent, boundary=boundary,
                                max_file_bytes=max_file_bytes)


# ---- shards ----------------------------------------------------------------------------------------


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


class _CappedStream(io.RawIOBase):
    """A decompressed stream that refuses to grow past ``cap`` bytes (a gzip bomb ends here)."""

    def __init__(self, stream: BinaryIO, cap: int, name: str):
        self.stream, self.cap, self.name, self.count = stream, cap, name, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.stream.readinto(buffer)
        self.count += n
        if self.count > self.cap:
            raise InputError(self.name, f"decompresses to more than {self.cap:,} bytes "
                                        f"({MAX_SHARD_EXPANSION}x its size): a compression bomb")
        return n


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header whole: refuse one larger than
    :data:`MAX_TAR_HEADER_BYTES` before it is read."""

    def _proc_member(self, tar):
        extended = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK)
        if self.type in extended and self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.HeaderError(f"extended header of {self.size:,} bytes")
        return super()._proc_member(tar)


_DECOMPRESSORS = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
                  (b"BZh", lambda f: bz2.BZ2File(f, "rb")),
                  (b"\xfd7zXZ\x00", lambda f: lzma.LZMAFile(f, "rb")))


@contextmanager
def _open_tar(shard: Path) -> Iterator[tarfile.TarFile]:
    """A plain tar opened for seeking (a huge member is passed over by a seek); a compressed one
    as a capped stream."""
    size = check_regular_file(shard, None).st_size
    with open_regular_file(shard) as raw:
        magic = raw.read(6)
        raw.seek(0)
        decompress = next((open_ for prefix, open_ in _DECOMPRESSORS if magic.startswith(prefix)), None)
        if decompress is None:
            tar = tarfile.open(fileobj=raw, mode="r:", tarinfo=_BoundedTarInfo)
        else:
            cap = max(MIN_SHARD_EXPANSION_BYTES, MAX_SHARD_EXPANSION * size)
            stream = _CappedStream(decompress(raw), cap, str(shard))
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo)
        with tar:
            yield tar


def iter_shards(location: str | os.PathLike, skips: SkipLog, shards: list[Path] | None = None, *,
                allow_outside_paths: bool = False, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[RawSample]:
    """Samples of WebDataset shards: members ``KEY.json`` (the row) and ``KEY.COLUMN.EXT`` (files).

    Members of one sample are consecutive in a shard, as WebDataset writes them. A member's size
    is checked from its header before it is read; a shard that cannot be read further is skipped
    from there on (logged), and the next one is read.
    """
    folder = Path(location) if Path(location).is_dir() else None
    boundary = folder.resolve() if folder is not None and not allow_outside_paths else None
    for shard in shards or shard_paths(location):
        try:
            if boundary is not None:
                resolve_file(shard.name, folder, boundary, field=str(shard))
            with _open_tar(shard) as tar:
                yield from _shard_samples(shard, tar, skips, max_file_bytes)
        except InputError as e:
            skips.add(e.source, f"{e.problem} (rest of the shard skipped)")
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
            skips.add(str(shard), f"unreadable shard (rest of it skipped): {e}")


def _shard_samples(shard: Path, tar: tarfile.TarFile, skips: SkipLog, max_file_bytes: int) -> Iterator[RawSample]:
    current: str | None = None
    members: dict[str, bytes] = {}
    total, problem = 0, None
    while (info := tar.next()) is not None:
        tar.members = []  # tarfile keeps every header it reads: millions of members would pile up
        if not info.isfile():
            continue
        key, _, ext = info.name.partition(".")
        if key != current and current is not None:
            yield from _shard_sample(shard, current, members, skips, problem)
            members, total, problem = {}, 0, None
        current = key
        if problem is not None:
            continue  # the sample is already bad: its other members are passed over unread
        source = f"{shard.name}:{info.name}"
        if info.size > max_file_bytes:
            problem = (source, f"member of {info.size:,} bytes exceeds the limit of {max_file_bytes:,} "
                               "(raise data.max_file_mb to accept it)")
        elif total + info.size > max_file_bytes:
            problem = (source, f"the sample's members exceed {max_file_bytes:,} bytes together")
        elif len(members) >= MAX_MEMBERS_PER_SAMPLE:
            problem = (source, f"more than {MAX_MEMBERS_PER_SAMPLE} members in one sample")
        else:
            members[ext] = tar.extractfile(info).read()
            total += info.size
    if current is not None:
        yield from _shard_sample(shard, current, members, skips, problem)


def _shard_sample(shard: Path, key: str, members: dict[str, bytes], skips: SkipLog,
                  problem: tuple[str, str] | None = None) -> Iterator[RawSample]:
    origin = f"{shard.name}:{key}"
    if problem is not None:
        skips.add(*problem)
        return
    if "json" not in members:
        skips.add(origin, "sample has no .json member")
        return
    line = members.pop("json")
    try:
        if len(line) > MAX_LINE_BYTES:
            raise InputError(origin, f"row of more than {MAX_LINE_BYTES:,} bytes")
        row = parse_row(line, origin)
    except InputError as e:
        skips.add(e.source, e.problem)
        return
    files = {ext.rsplit(".", 1)[0]: data for ext, data in members.items()}
    yield RawSample(row=row, origin=origin, files=files)


def _has_metadata(path: Path) -> bool:
    try:
        return bool(find_metadata(path))
    except InputError:
        return False


def iter_source(location: str | os.PathLike, skips: SkipLog, *, allow_outside_paths: bool = False,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[RawSample]:
    """A data set folder, a folder of shards, or one shard."""
    path = Path(location)
    limits = dict(allow_outside_paths=allow_outside_paths, max_file_bytes=max_file_bytes)
    if path.is_dir() and _has_metadata(path):
        return iter_folder(path, skips, **limits)
    return iter_shards(path, skips, **limits)


def write_shards(
    directory: str | os.PathLike, out: str | os.PathLike, *, samples_per_shard: int = 1000,
    skips: SkipLog | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> list[Path]:
    """Pack a data set folder into WebDataset shards ``shard-000000.tar``, ... under ``out``.

    Files are copied as they are (no decoding); a row whose file is missing, unreadable or
    outside the folder is skipped and logged: a shard never carries a file from outside its
    source folder, whatever the row says. Shards are byte-for-byte reproducible (fixed member
    times and owners).
    """
    import webdataset as wds

    skips = skips if skips is not None else SkipLog()
    find_metadata(Path(directory))  # a missing or empty folder fails before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / "shard-%06d.tar")
    seen: set[str] = set()
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0.0) as sink:
        for number, raw in enumerate(iter_folder(Path(directory), skips, max_file_bytes=max_file_bytes)):
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

