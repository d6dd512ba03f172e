"""A FAISS index of embeddings on disk, memory-mapped when opened.

Inner product on L2-normalised vectors is cosine similarity. Small collections get an exact
index (``IndexFlatIP``); above ``exact_limit`` vectors an HNSW graph answers in well under a
millisecond at a recall near exact. An index folder holds ``vectors.faiss``, ``items.jsonl``
(one row a vector: what it is and where its file is) and ``index.json`` (how it was made).
The three are written into a new folder that is swapped in whole, so a reader or a crash sees
one complete index, old or new; opening checks that the parts agree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from polymodal.errors import InputError
from polymodal.models.folder import write_folder_atomically

EXACT_LIMIT = 50_000
HNSW_NEIGHBOURS = 32
HNSW_BUILD_SEARCH = 80
HNSW_QUERY_SEARCH = 128
VECTORS_FILE, ITEMS_FILE, INFO_FILE = "vectors.faiss", "items.jsonl", "index.json"


def make_index(vectors: np.ndarray, kind: str = "auto", exact_limit: int = EXACT_LIMIT) -> faiss.Index:
    """An inner-product index over ``vectors`` (N, D) float32; ``kind`` is auto, exact or hnsw."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if kind == "auto":
        kind = "exact" if len(vectors) <= exact_limit else "hnsw"
    dim = vectors.shape[1]
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_BUILD_SEARCH
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose auto, exact or hnsw")
    index.add(vectors)
    return index


@dataclass
class VectorIndex:
    index: faiss.Index
    items: list[dict]
    info: dict
    directory: Path | None = field(default=None, compare=False)  # where it was opened from

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Scores and positions of the top ``k`` items for each query (Q, D)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.index.d:
            raise InputError(self.directory or "index", f"the query has {queries.shape[1]} dimensions but the "
                             f"index's vectors have {self.index.d} (was it built with another model?)")
        if isinstance(self.index, faiss.IndexHNSW):
            self.index.hnsw.efSearch = max(HNSW_QUERY_SEARCH, k)
        return self.index.search(queries, min(k, self.index.ntotal))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index folder as one unit (see the module's docstring)."""
        if len(self.items) != self.index.ntotal:
            raise ValueError(f"{len(self.items)} items for {self.index.ntotal} vectors: one item a vector")
        info = {**self.info, "count": self.index.ntotal, "dim": self.index.d,
                "kind": "hnsw" if isinstance(self.index, faiss.IndexHNSW) else "exact"}

        def fill(folder: Path) -> None:
            faiss.write_index(self.index, str(folder / VECTORS_FILE))
            with open(folder / ITEMS_FILE, "w") as f:
                for item in self.items:
                    f.write(json.dumps(item) + "\n")
            (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

        return write_folder_atomically(directory, fill, replaceable=is_index_folder)

    @classmethod
    def open(cls, directory: str | os.PathLike, mmap: bool = True) -> VectorIndex:
        """The index in ``directory``, its vectors memory-mapped; a clear error if a part is
        missing, unreadable, or disagrees with the others (an index edited or copied in part)."""
        directory = Path(directory)
        for name in (VECTORS_FILE, ITEMS_FILE, INFO_FILE):
            if not (directory / name).is_file():
                raise InputError(directory, f"not an index folder: {name} is missing")
        info = _read_json(directory / INFO_FILE)
        if not isinstance(info, dict):
            raise InputError(directory / INFO_FILE, "not a JSON object")
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(directory / VECTORS_FILE), flags)
        except RuntimeError as e:
            raise InputError(directory / VECTORS_FILE, f"unreadable: {str(e).splitlines()[0]}") from None
        items = []
        with open(directory / ITEMS_FILE, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    items.append(json.loads(line))
                except ValueError as e:
                    raise InputError(f"{directory / ITEMS_FILE} line {number}", f"not valid JSON: {e}") from None
        parts = {f"{VECTORS_FILE} holds": index.ntotal, f"{ITEMS_FILE} lists": len(items)}
        if "count" in info:
            parts[f"{INFO_FILE} says"] = info["count"]
        if len(set(parts.values())) > 1:
            counts = ", ".join(f"{k} {v}" for k, v in parts.items())
            raise InputError(directory, f"the index's parts disagree ({counts} vectors): build it again")
        if info.get("dim", index.d) != index.d:
            raise InputError(directory, f"the index's parts disagree ({VECTORS_FILE} holds {index.d}-dimensional "
                             f"vectors, {INFO_FILE} says {info['dim']}): build it again")
        return cls(index, items, info, directory)


def is_index_folder(directory: Path) -> bool:
    """Whether ``directory`` holds (a part of) an index: the only kind of folder a save replaces."""
    return any((directory / name).is_file() for name in (VECTORS_FILE, ITEMS_FILE, INFO_FILE))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON: {e}") from None
