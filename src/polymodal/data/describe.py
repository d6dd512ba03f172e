"""What a data set says about itself: the rows of each split, and what kind of data set it is.

Both are read without decoding a file, so that commands that only check a data set (``polymodal
eval`` refusing a split it lacks, the demo sizing its budgets) stay cheap and import nothing of
training.

The *kind* comes from the data set's own description, :data:`DESCRIPTION_FILE` beside its
``metadata.jsonl`` (or its shards): the shapes world writes ``{"name": "shapes", ...}`` there
(:func:`polymodal.data.shapes.world_info`). A folder without one is a plain data set. The kind
is read from that file and never guessed from the rows: a user's folder whose rows happen to
carry an ``objects`` column is still a plain folder.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from polymodal.data.dataset import DecodeOptions, row_split
from polymodal.data.source import SkipLog, iter_source, read_regular_file
from polymodal.errors import InputError

DESCRIPTION_FILE = "world.json"
MAX_DESCRIPTION_BYTES = 1 << 20  # a description is a few hundred bytes; a larger file is not one


def split_counts(location: str | os.PathLike, options: DecodeOptions | None = None) -> dict[str, int]:
    """Rows of each split of a data set, most first, read from its metadata without decoding a
    file; rows without a split are counted where :func:`row_split` puts them."""
    limits = options.source_limits if options is not None else {}
    counts = Counter(row_split(raw.row) for raw in iter_source(location, SkipLog(quiet=True), **limits))
    return dict(counts.most_common())


def splits_text(counts: dict[str, int]) -> str:
    """``train 160, val 20, test 20`` (or ``none``)."""
    return ", ".join(f"{name} {n:,}" for name, n in counts.items()) or "none (no rows)"


def description_path(location: str | os.PathLike) -> Path:
    """Where the description of the data set at ``location`` (a folder, its ``metadata.jsonl``,
    a folder of shards or one shard) would be: :data:`DESCRIPTION_FILE` in its folder."""
    path = Path(location)
    return (path if path.is_dir() else path.parent) / DESCRIPTION_FILE


def dataset_kind(location: str | os.PathLike) -> str | None:
    """The ``name`` its description gives the data set at ``location`` (``"shapes"``), or None
    for a data set without a description or whose description names no kind.

    The description is read from outside, so it is checked first: a regular file of at most
    :data:`MAX_DESCRIPTION_BYTES` inside the data set's folder (a link may not lead out), a JSON
    object, a string ``name``; anything else is an :class:`InputError` naming the file.
    """
    path = description_path(location)
    if not os.path.lexists(path):
        return None
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise InputError(path, f"cannot resolve the path: {e}") from e
    if not resolved.is_relative_to(path.parent.resolve()):
        raise InputError(path, f"a symbolic link leads outside the data set folder, to {resolved}")
    raw = read_regular_file(path, MAX_DESCRIPTION_BYTES)
    try:
        info = json.loads(raw.decode("utf-8"))
    except RecursionError:  # nesting deeper than the parser's stack, well inside the size limit
        raise InputError(path, "not a data set description (JSON nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(path, f"not a data set description (invalid JSON: {e})") from e
    if not isinstance(info, dict):
        raise InputError(path, f"a data set description is a JSON object, got {type(info).__name__}")
    name = info.get("name")
    if name is not None and not isinstance(name, str):
        raise InputError(f"{path}: name", f"the kind of data set is a string, got {type(name).__name__}")
    return name or None


def copy_description(location: str | os.PathLike, out: str | os.PathLike) -> Path | None:
    """Copy the description of the data set at ``location`` to ``out`` (e.g. the folder its
    shards were packed into), so the packed data set is still the same kind; checked as
    :func:`dataset_kind` checks it. Returns the copy, or None where there is no description."""
    if dataset_kind(location) is None and not os.path.lexists(description_path(location)):
        return None
    target = Path(out) / DESCRIPTION_FILE
    target.write_bytes(read_regular_file(description_path(location), MAX_DESCRIPTION_BYTES))
    return target
