"""A FAISS index of embeddings on disk, memory-mapped when opened.

Inner product on L2-normalised vectors is cosine similarity. Small collections get an exact
index (``IndexFlatIP``); above ``exact_limit`` vectors an HNSW graph answers in well under a
millisecond at a recall near exact. An index folder holds ``vectors.faiss``, ``items.jsonl``
(one row a vector: what it is and where its file is) and ``index.json`` (how it was made).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from polymodal.errors import InputError

EXACT_LIMIT = 50_000
HNSW_NEIGHBOURS = 32
HNSW_BUILD_SEARCH = 80
HNSW_QUERY_SEARCH = 128


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

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Scores and positions of the top ``k`` items for each query (Q, D)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.index.d:
            raise ValueError(f"query has {queries.shape[1]} dimensions; the index has {self.index.d}")
        if isinstance(self.index, faiss.IndexHNSW):
            self.index.hnsw.efSearch = max(HNSW_QUERY_SEARCH, k)
        return self.index.search(queries, min(k, self.index.ntotal))

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / "vectors.faiss.tmp"))
        os.replace(directory / "vectors.faiss.tmp", directory / "vectors.faiss")
        with open(directory / "items.jsonl.tmp", "w") as f:
            for item in self.items:
                f.write(json.dumps(item) + "\n")
        os.replace(directory / "items.jsonl.tmp", directory / "items.jsonl")
        info = {**self.info, "count": self.index.ntotal, "dim": self.index.d,
                "kind": "hnsw" if isinstance(self.index, faiss.IndexHNSW) else "exact"}
        (directory / "index.json").write_text(json.dumps(info, indent=2) + "\n")
        return directory

    @classmethod
    def open(cls, directory: str | os.PathLike, mmap: bool = True) -> VectorIndex:
        directory = Path(directory)
        for name in ("vectors.faiss", "items.jsonl", "index.json"):
            if not (directory / name).is_file():
                raise InputError(directory, f"not an index folder: {name} is missing")
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(directory / "vectors.faiss"), flags)
        items = [json.loads(line) for line in (directory / "items.jsonl").read_text().splitlines()]
        info = json.loads((directory / "index.json").read_text())
        return cls(index, items, info)
