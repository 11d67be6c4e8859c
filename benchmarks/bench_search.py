"""Search benchmarks: filtered search, collection dedup, batches of queries.

    python benchmarks/bench_search.py filter --n 1000000 --dim 128 --json bench-out/filter.json
    python benchmarks/bench_search.py dedup  --n 1000000 --dim 128 --json bench-out/dedup.json
    python benchmarks/bench_search.py batch  --queries 1000 --json bench-out/batch.json
    python benchmarks/bench_search.py querybank --n 200000 --dim 256 --index-type flat --json bench-out/qb.json

filter: synthetic CLIP-like shards (retriever/indexes/synthetic.py; metadata column bucket = id
mod 1000), one index built through the library, 200 held-out queries run one at a time (as a
user's would be). For selectivities 50%, 5%, 0.1% (`bucket < 500 / 50 / 1`): recall@10 against
exact filtered search (numpy over every vector), median latency against the same index unfiltered,
and the filter's one-off cost (DuckDB over the rows file, plus gathering the matching vectors
when few match; both cached for later queries). faiss runs with --threads OpenMP threads.

dedup: shards with planted near-copies (1% of rows are copies of other rows plus noise, cosine ≥
0.99), `find_duplicates` in a child process (its own peak RSS); reports time, peak RSS and the
fraction of planted copies found.

batch: the tiny test model over 100k random vectors written as shards under its identity;
1,000 text queries through Retriever.search_batch (what `--queries` calls) against the raw loop
(encode_texts in chunks + faiss index.search, no metadata), side by side; plus the CLI with
--queries (whole process, model load included) and single CLI calls (a few, per-call cost).

querybank: the cost and exactness of querybank ranking (retriever.querybank). CLIP-like shards
written under a local-dir model whose folder carries a bank (captions drawn from the same
generator, tau 0.1); one index built with the bank and one without (--no-querybank), build times
side by side; then --queries text-like queries one at a time, cosine ranking against querybank
ranking (alternating), and how often querybank hits equal brute force over every vector
(cosine + bias), with the candidates each query needed.

threads: single queries over flat indexes (d=512) of a few sizes, through the library's search
(`indexes/rerank.search_index`: one faiss thread when the search is small) against the same call
with faiss's whole OpenMP pool, alternating, with a CPU burner on one core (what a server's
encoder, or any other process, does to the second core) and without it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retriever.indexes import BuildConfig, build_index  # noqa: E402
from retriever.indexes.synthetic import ClipLike, write_synthetic_shards  # noqa: E402
from retriever.search import Retriever  # noqa: E402
from retriever.shards import ShardSet, shard_name, shard_schema, write_shard  # noqa: E402

SELECTIVITIES = {"50%": "bucket < 500", "5%": "bucket < 50", "0.1%": "bucket < 1"}


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def all_vectors(shards: Path) -> np.ndarray:
    return np.concatenate([v for v, _ in ShardSet(shards).iter_vectors("image", extra_columns=())])


def exact_top(vecs: np.ndarray, q: np.ndarray, mask: np.ndarray | None, k: int, bias=None) -> np.ndarray:
    """Brute-force top-k rows per query by cosine (plus a per-row `bias`), among `mask`'s rows."""
    out = np.empty((len(q), k), np.int64)
    for i in range(len(q)):
        s = vecs @ q[i]
        if bias is not None:
            s = s + bias
        if mask is not None:
            s[~mask] = -np.inf
        top = np.argpartition(-s, k)[:k]
        out[i] = top[np.argsort(-s[top])]
    return out


def paired_ms(fa, fb, queries: np.ndarray) -> tuple[float, float]:
    """Median ms per query of fa and fb, alternating query by query so that load hits both alike."""
    ta, tb = [], []
    for i in range(len(queries)):
        for fn, times in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn(queries[i : i + 1])
            times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(ta)), 1000 * float(np.median(tb))


def bench_filter(args) -> dict:
    work = Path(args.workdir) / f"filter-{args.n}-{args.dim}"
    gen = ClipLike(dim=args.dim, latent=min(32, args.dim // 2), clusters=1000, seed=0)
    shards = work / "shards"
    if not (shards / shard_name(0)).exists():
        write_synthetic_shards(shards, gen, args.n)
    index = work / f"index-{args.index_type}"
    if not (index / "manifest.json").exists():
        t0 = time.perf_counter()
        build_index(
            shards,
            index,
            BuildConfig(index_type=args.index_type, flat_max=0, target_recall=args.target_recall, tune_queries=300),
        )
        print(f"built {args.index_type} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    vecs = all_vectors(shards)
    bucket = np.arange(len(vecs)) % 1000
    q = gen.sample(args.queries, stream=77)
    rows = []
    with Retriever(index) as r:
        factory = r.manifest.indexes["image"].factory
        r.search_vectors(q[:5], 10)  # warm
        truth = exact_top(vecs, q, None, 10)
        hits = [r.search_vectors(q[i : i + 1], 10)[0] for i in range(len(q))]
        base_recall = float(np.mean([len({h.id for h in hs} & set(t.tolist())) / 10 for hs, t in zip(hits, truth)]))
        for name, where in SELECTIVITIES.items():
            t0 = time.perf_counter()
            mask = r.filter_mask("image", where)
            r.search_vectors(q[:1], 10, where=where)  # gathers the matching vectors, if it will
            filter_ms = 1000 * (time.perf_counter() - t0)
            assert np.array_equal(mask, bucket < int(where.split("<")[1]))
            truth = exact_top(vecs, q, mask, 10)
            hits = [r.search_vectors(q[i : i + 1], 10, where=where)[0] for i in range(len(q))]
            recall = float(np.mean([len({h.id for h in hs} & set(t.tolist())) / 10 for hs, t in zip(hits, truth)]))
            base_ms, ms = paired_ms(
                lambda x: r.search_vectors(x, 10), lambda x, w=where: r.search_vectors(x, 10, where=w), q
            )
            rows.append(
                {
                    "selectivity": name,
                    "where": where,
                    "strategy": hits[0].report.filter_strategy,
                    "full_k": all(len(h) == 10 for h in hits),
                    "recall@10": round(recall, 4),
                    "unfiltered_recall@10": round(base_recall, 4),
                    "ms_filtered": round(ms, 3),
                    "ms_unfiltered": round(base_ms, 3),
                    "latency_ratio": round(ms / base_ms, 2),
                    "filter_eval_ms_once": round(filter_ms, 1),
                }
            )
    print(f"\nfiltered search, N={args.n}, d={args.dim}, {factory}, {args.queries} queries one at a time")
    print(
        "| selectivity | strategy | k always full | recall@10 (unfiltered) | ms filtered | ms unfiltered | ratio | filter eval once |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(
            f"| {x['selectivity']} | {x['strategy']} | {x['full_k']} | {x['recall@10']} ({x['unfiltered_recall@10']}) "
            f"| {x['ms_filtered']} | {x['ms_unfiltered']} | {x['latency_ratio']} | {x['filter_eval_ms_once']} ms |"
        )
    return {"n": args.n, "dim": args.dim, "factory": factory, "rows": rows}


def write_planted(folder: Path, n: int, dim: int, copies_frac: float = 0.01, seed: int = 0) -> dict:
    """Shards of n rows where `copies_frac`·n rows (in the second half) are noisy copies of rows in
    the first half (cosine ≈ 0.995). Returns {copy row: source row}."""
    gen = ClipLike(dim=dim, latent=min(32, dim // 2), seed=seed)
    rng = np.random.default_rng(seed)
    half = n // 2
    first = gen.sample(half, stream=0)  # held while writing: n/2·d·4 bytes (256 MB at 1M×128)
    m = int(n * copies_frac)
    copy_rows = np.sort(rng.choice(np.arange(half, n), m, replace=False))
    sources = rng.integers(0, half, m)
    second = gen.sample(n - half, stream=1)
    noisy = first[sources] + (0.1 / np.sqrt(dim)) * rng.standard_normal((m, dim)).astype(np.float32)
    second[copy_rows - half] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    schema = shard_schema(gen.identity())
    for s, lo in enumerate(range(0, n, 100_000)):
        hi = min(n, lo + 100_000)
        v = np.concatenate([first[lo : min(hi, half)], second[max(lo, half) - half : max(hi, half) - half]])
        write_shard(
            folder / shard_name(s),
            schema,
            list(range(lo, hi)),
            [f"img/{i}.jpg" for i in range(lo, hi)],
            [None] * (hi - lo),
            v,
            np.zeros_like(v),
            np.zeros(hi - lo, bool),
        )
    return dict(zip(copy_rows.tolist(), sources.tolist()))


def child_dedup(shards: str, out: str, threshold: float) -> None:
    from retriever.dedup import find_duplicates

    base = vm_hwm()
    res = find_duplicates(shards, out, threshold)
    print(json.dumps({**res.to_dict(), "peak_rss": vm_hwm(), "base_rss": base}))


def bench_dedup(args) -> dict:
    work = Path(args.workdir) / f"dedup-{args.n}-{args.dim}"
    shards = work / "shards"
    planted_file = work / "planted.json"
    if not planted_file.exists():
        planted = write_planted(shards, args.n, args.dim)
        planted_file.write_text(json.dumps(planted))
    planted = {int(a): b for a, b in json.loads(planted_file.read_text()).items()}
    cmd = [sys.executable, __file__, "_child_dedup", str(shards), str(work / "groups.parquet"), str(args.threshold)]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    import pyarrow.parquet as pq

    groups = pq.read_table(work / "groups.parquet", columns=["id", "group"]).to_pydict()
    group_of = dict(zip(groups["id"], groups["group"]))
    found = sum(1 for c, src in planted.items() if c in group_of and group_of.get(src) == group_of[c])
    row = {
        "n": args.n,
        "dim": args.dim,
        "threshold": args.threshold,
        "index": res["index"],
        "seconds": res["seconds"],
        "peak_rss_mib": round(res["peak_rss"] / 2**20),
        "base_rss_mib": round(res["base_rss"] / 2**20),
        "groups": res["groups"],
        "duplicates": res["duplicates"],
        "planted": len(planted),
        "planted_found": round(found / len(planted), 4),
    }
    print(f"\ncollection dedup, N={args.n}, d={args.dim}, threshold {args.threshold}")
    print("| index | seconds | peak RSS (interpreter) | groups | rows beyond representative | planted copies found |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {row['index']} | {row['seconds']} | {row['peak_rss_mib']} MiB ({row['base_rss_mib']} MiB) | {row['groups']} "
        f"| {row['duplicates']} | {row['planted_found']} of {row['planted']} |"
    )
    return row


def bench_batch(args) -> dict:
    """search_batch vs the raw encode + faiss loop, and the CLI, with the tiny test model."""
    import faiss

    from retriever.models.encode import encode_texts
    from retriever.models.load import load_model

    tiny = str(ROOT / "tests" / "assets" / "tiny-clip.json")
    encoder = load_model(tiny)
    work = Path(args.workdir) / "batch"
    shards, index = work / "shards", work / "index"
    if not (index / "manifest.json").exists():
        rng = np.random.default_rng(0)
        schema = shard_schema(encoder.identity)
        n, d = 100_000, encoder.embed_dim
        v = rng.standard_normal((n, d)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        write_shard(
            shards / shard_name(0),
            schema,
            list(range(n)),
            [f"img/{i}.jpg" for i in range(n)],
            [None] * n,
            v,
            np.zeros_like(v),
            np.zeros(n, bool),
            [{"bucket": i % 1000} for i in range(n)],
        )
        build_index(shards, index, BuildConfig(index_type="ivf", flat_max=0))
    words = "dog cat snow grass red blue house tree car sky beach mountain city night flower bird".split()
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(words, 3)) + f" {i}" for i in range(args.queries)]
    batch = 256
    with Retriever(index, encoder) as r:
        raw_index = faiss.read_index(str(index / "image.faiss"))
        from retriever.indexes.open import set_search_params

        set_search_params(raw_index, r.manifest.indexes["image"].search_params)

        def raw():
            for lo in range(0, len(texts), batch):
                raw_index.search(encode_texts(encoder, texts[lo : lo + batch], batch), 10)

        def ours():
            r.search_batch(texts, batch_size=batch)

        ours()
        raw()  # warm both
        t_raw, t_ours = [], []
        for _ in range(args.repeat):  # interleaved: the machine's load hits both alike
            t0 = time.perf_counter()
            raw()
            t_raw.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ours()
            t_ours.append(time.perf_counter() - t0)
    qfile = work / "queries.txt"
    qfile.write_text("\n".join(texts) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "retriever", "search", str(index), "--model", tiny]
    t0 = time.perf_counter()
    subprocess.run(
        [*cli, "--queries", str(qfile), "--out", str(work / "out.jsonl")], check=True, env=env, capture_output=True
    )
    t_cli_batch = time.perf_counter() - t0
    singles = []
    for t in texts[: args.single_calls]:
        t0 = time.perf_counter()
        subprocess.run([*cli, t, "--json"], check=True, env=env, capture_output=True)
        singles.append(time.perf_counter() - t0)
    n = len(texts)
    row = {
        "queries": n,
        "raw_ms_per_query": round(1000 * min(t_raw) / n, 3),
        "search_batch_ms_per_query": round(1000 * min(t_ours) / n, 3),
        "throughput_vs_raw": round(min(t_raw) / min(t_ours), 3),
        "cli_queries_ms_per_query": round(1000 * t_cli_batch / n, 2),
        "cli_single_ms_per_query": round(1000 * float(np.median(singles)), 1),
        "single_calls_timed": len(singles),
    }
    print(f"\n{n} text queries, tiny-clip, IVF over 100k vectors, k=10, best of {args.repeat}")
    print("| path | ms/query | vs raw |")
    print("|---|---|---|")
    print(f"| raw loop (encode_texts + faiss index.search) | {row['raw_ms_per_query']} | 1.00 |")
    print(
        f"| Retriever.search_batch (hits with metadata) | {row['search_batch_ms_per_query']} | {row['throughput_vs_raw']} |"
    )
    print(f"| CLI --queries (whole process incl. model load) | {row['cli_queries_ms_per_query']} | |")
    print(f"| CLI single calls (median of {len(singles)}) | {row['cli_single_ms_per_query']} | |")
    return row


def bench_querybank(args) -> dict:
    import hashlib

    from retriever.identity import ModelIdentity
    from retriever.querybank import QueryBank, write_querybank

    work = Path(args.workdir) / f"querybank-{args.n}-{args.dim}"
    gen = ClipLike(dim=args.dim, latent=min(32, args.dim // 2), clusters=1000, seed=0)
    model = work / "model"
    sha = hashlib.sha256(f"querybank bench {args.dim}".encode()).hexdigest()
    bank = QueryBank(gen.sample(4096, stream=99), gen.sample(4096, stream=98), 0.1, sha)
    shards = work / "shards"
    if not (shards / shard_name(0)).exists():
        model.mkdir(parents=True, exist_ok=True)
        write_querybank(model, bank)
        identity = ModelIdentity(f"local-dir:{model.resolve()}", None, sha, args.dim)
        write_synthetic_shards(shards, gen, args.n, identity=identity)
    vecs = all_vectors(shards)
    bias = bank.bias(vecs, "image")
    builds = {}
    for name, on in (("plain", False), ("querybank", True)):
        t0 = time.perf_counter()
        cfg = BuildConfig(index_type=args.index_type, flat_max=0, querybank=on)
        build_index(shards, work / f"index-{args.index_type}-{name}", cfg)
        builds[name] = time.perf_counter() - t0
    q = gen.sample(args.queries, stream=77)
    with Retriever(work / f"index-{args.index_type}-querybank") as r:
        factory = r.manifest.indexes["image"].factory
        r.search_vectors(q[:2], 10, query_modality="text")  # warm: reads the bias column once
        hits = [r.search_vectors(q[i : i + 1], 10, query_modality="text")[0] for i in range(len(q))]
        plain_ms, qb_ms = paired_ms(
            lambda x: r.search_vectors(x, 10), lambda x: r.search_vectors(x, 10, query_modality="text"), q
        )
        plain = [r.search_vectors(q[i : i + 1], 10)[0] for i in range(len(q))]
    truth = exact_top(vecs, q, None, 10, bias).tolist()
    same = float(np.mean([[h.id for h in hs] == t for hs, t in zip(hits, truth)]))
    overlap = float(np.mean([len({h.id for h in hs} & set(t)) / 10 for hs, t in zip(hits, truth)]))
    moved = float(np.mean([[h.id for h in a] != [h.id for h in b] for a, b in zip(hits, plain)]))
    fetched = [h.report.extra["querybank_candidates"] for h in hits]
    row = {
        "n": args.n,
        "dim": args.dim,
        "factory": factory,
        "build_s_plain": round(builds["plain"], 2),
        "build_s_querybank": round(builds["querybank"], 2),
        "ms_cosine": round(plain_ms, 3),
        "ms_querybank": round(qb_ms, 3),
        "latency_ratio": round(qb_ms / plain_ms, 2),
        "top10_equal_to_brute_force": round(same, 4),
        "recall@10_vs_brute_force": round(overlap, 4),
        "queries_reordered": round(moved, 4),
        "candidates_median": int(np.median(fetched)),
        "candidates_max": int(max(fetched)),
    }
    print(f"\nquerybank ranking, N={args.n}, d={args.dim}, {factory}, {args.queries} queries one at a time, bank 4,096")
    print(
        "| build s (plain / bank) | ms cosine | ms querybank | ratio | top-10 = brute force | recall@10 | reordered | candidates median / max |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {row['build_s_plain']} / {row['build_s_querybank']} | {row['ms_cosine']} | {row['ms_querybank']} | "
        f"{row['latency_ratio']} | {row['top10_equal_to_brute_force']} | {row['recall@10_vs_brute_force']} | "
        f"{row['queries_reordered']} | {row['candidates_median']} / {row['candidates_max']} |"
    )
    return row


def _burn(seconds: float) -> subprocess.Popen:
    """A child that keeps one core busy for `seconds` (stands in for any other work on the machine)."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def bench_threads(args) -> dict:
    import faiss

    from retriever.indexes import settings
    from retriever.indexes.rerank import search_index

    rng = np.random.default_rng(0)
    rows = []
    for busy in (False, True):
        burner = _burn(3600) if busy else None
        try:
            for n in (2_000, 20_000, 200_000):
                index = faiss.IndexFlatIP(512)
                index.add(rng.standard_normal((n, 512)).astype(np.float32))
                q = rng.standard_normal((1, 512)).astype(np.float32)
                runs = {"rule": partial(search_index, index, q, 10), "pool": partial(index.search, q, 10)}
                times: dict[str, list[float]] = {name: [] for name in runs}
                for _ in range(args.repeat * 10):
                    for name, run in runs.items():
                        t = time.perf_counter()
                        run()
                        times[name].append(time.perf_counter() - t)
                rule, pool = (float(np.median(times[k])) * 1000 for k in ("rule", "pool"))
                with settings.search_threads(index, 1, 10):
                    threads = faiss.omp_get_max_threads()
                rows.append({"busy_core": busy, "n": n, "threads_rule": threads, "rule_ms": round(rule, 3),
                             "pool_ms": round(pool, 3), "pool_over_rule": round(pool / rule, 2)})  # fmt: skip
        finally:
            if burner is not None:
                burner.kill()
    print(f"\nOne query, flat d=512, median of {args.repeat * 10}, faiss pool {faiss.omp_get_max_threads()} threads")
    print("| other core | vectors | threads (rule) | rule ms | pool ms | pool / rule |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'busy' if r['busy_core'] else 'idle'} | {r['n']:,} | {r['threads_rule']} | {r['rule_ms']} "
              f"| {r['pool_ms']} | {r['pool_over_rule']} |")  # fmt: skip
    return {"threads": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if len(sys.argv) > 1 and sys.argv[1] == "_child_dedup":
        child_dedup(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return
    p.add_argument("what", choices=["filter", "dedup", "batch", "threads", "querybank"])
    p.add_argument("--threshold", type=float, default=0.99)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--single-calls", type=int, default=5)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--index-type", default="ivf")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--workdir", default="bench-out/query")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads (1: steady single-query latency)")
    args = p.parse_args()
    import faiss

    if args.what != "threads":  # that mode compares thread counts itself
        faiss.omp_set_num_threads(args.threads)
    benches = {
        "filter": bench_filter,
        "dedup": bench_dedup,
        "batch": bench_batch,
        "threads": bench_threads,
        "querybank": bench_querybank,
    }
    result = benches[args.what](args)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
