"""Search latency and recall of polymodal's FAISS index on 100,000 vectors.

Vectors are 256-d, unit length, drawn around 1,000 cluster centres (embeddings cluster; uniform
random vectors are the worst case for any approximate index). The automatically chosen index
(HNSW above 50,000 vectors) is compared with exact search in the same run: median and p95
latency of single queries, and Recall@10 against the exact top 10. The index is saved and
reopened memory-mapped, as `polymodal search` opens it.

    python benchmarks/index_search.py [--n 100000] [--queries 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np

from polymodal.index.vectors import VectorIndex, make_index


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--uniform", action="store_true", help="uniform random vectors (the worst case)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(1000, args.dim)))
    vectors = unit(centres[rng.integers(1000, size=args.n)] + 0.35 * rng.normal(size=(args.n, args.dim)) / np.sqrt(args.dim) * 4)
    queries = unit(centres[rng.integers(1000, size=args.queries)] + 0.35 * rng.normal(size=(args.queries, args.dim)) / np.sqrt(args.dim) * 4)
    if args.uniform:
        vectors, queries = unit(rng.normal(size=(args.n, args.dim))), unit(rng.normal(size=(args.queries, args.dim)))

    start = time.perf_counter()
    approx = make_index(vectors)  # auto: HNSW at this size
    build_s = time.perf_counter() - start
    exact = make_index(vectors, kind="exact")
    with tempfile.TemporaryDirectory() as tmp:
        VectorIndex(approx, [{} for _ in range(args.n)], {}).save(tmp)
        opened = VectorIndex.open(tmp)  # memory-mapped
        report = {"n": args.n, "dim": args.dim, "data": "uniform" if args.uniform else "clustered",
                  "kind": opened.info["kind"], "build_s": build_s}
        for name, index in (("approx", opened), ("exact", VectorIndex(exact, [], {}))):
            times, hits = [], []
            for q in queries:
                t = time.perf_counter()
                _, ids = index.search(q[None], 10)
                times.append(time.perf_counter() - t)
                hits.append(ids[0])
            report[name] = {"median_ms": statistics.median(times) * 1e3,
                            "p95_ms": float(np.percentile(times, 95) * 1e3)}
            report[name + "_ids"] = hits
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(report.pop("approx_ids"), report.pop("exact_ids"), strict=True)])
    report["recall_at_10_vs_exact"] = float(recall)
    report["speedup_vs_exact"] = report["exact"]["median_ms"] / report["approx"]["median_ms"]
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
