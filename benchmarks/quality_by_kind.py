"""Where held-out text→image retrieval fails: recall of the demo recipe's heads by kind of emoji.

Trains the demo recipe's heads (OpenMoji rows, 1,024-d, epoch chosen on validation; no refit) on
the cache of quality_features.py for each seed, ranks the held-out Twemoji pictures for every
held-out caption, and groups the queries by kind (flags, keycaps, ZWJ sequences, Unicode blocks).
Prints a table; `--json` writes it.

    cd benchmarks && PYTHONPATH=.. python quality_by_kind.py --features q/lite0 --style-features q/lite0-om
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import quality_ablation as qa
import torch


def emoji_kind(char: str, name: str) -> str:
    """A coarse kind of an emoji, from its code points (Unicode blocks) and its English name."""
    first = ord(char[0])
    if 0x1F1E6 <= first <= 0x1F1FF or first == 0x1F3F4 or name.lower().startswith("flag"):
        return "flags"
    if "keycap" in name.lower():
        return "keycaps"
    if "\u200d" in char:
        return "ZWJ sequences (people, families, jobs)"
    if any(w in name.lower().split() for w in ("man", "woman", "person", "people", "boy", "girl", "family")):
        return "people (one code point)"
    if 0x1F600 <= first <= 0x1F64F:
        return "faces and gestures"
    if 0x1F680 <= first <= 0x1F6FF:
        return "transport and map"
    if 0x1F300 <= first <= 0x1F5FF or 0x1F900 <= first <= 0x1FAFF:
        return "objects, animals, food, nature"
    return "symbols and other"


def heldout_ranks(heads: qa.Heads, data: qa.Data, image: torch.Tensor, r: qa.Recipe) -> tuple[np.ndarray, list[int]]:
    """0-based rank of the true picture for every held-out caption (the eval view of each picture,
    as `quality_ablation.evaluate` scores it), and the caption's item."""
    from retriever.metrics import first_hit_ranks

    idx = data.splits["heldout"]
    img, txt, owner = qa.embed_split(heads, data, idx, image, r, qa._identity)
    return first_hit_ranks(txt, img, [[j] for j in owner]), [idx[j] for j in owner]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", required=True, help="Twemoji cache (quality_features.py)")
    ap.add_argument("--style-features", default=None, help="OpenMoji cache: train with its rows (the demo recipe)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = qa.Data(Path(args.features), Path(args.style_features) if args.style_features else None)
    image = data.image(("head",))
    recipe = replace(qa.Recipe(), style_rows=args.style_features is not None, embed_dim=1024)
    by_kind: dict[str, list[int]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        _, heads = qa._fit(data, replace(recipe, seed=seed))
        ranks, items = heldout_ranks(heads, data, image, recipe)
        for rank, i in zip(ranks.tolist(), items):
            it = data.items[i]
            by_kind.setdefault(emoji_kind(it.char, it.captions[0]), []).append(rank)
    total = sum(len(v) for v in by_kind.values())
    table = []
    for kind, ranks_of in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
        r = np.array(ranks_of)
        table.append(
            {
                "kind": kind,
                "query_share": round(len(r) / total, 4),
                **{f"t2i_R@{k}": round(float((r < k).mean()), 4) for k in (1, 5, 10)},
            }
        )
    everything = np.concatenate([np.array(v) for v in by_kind.values()])
    no_flags = np.concatenate([np.array(v) for k, v in by_kind.items() if k != "flags"])
    print("| kind | share of queries | t2i R@1 | R@5 | R@10 |\n|---|---|---|---|---|")
    for row in table:
        print(
            f"| {row['kind']} | {100 * row['query_share']:.1f}% | "
            + " | ".join(f"{100 * row[f't2i_R@{k}']:.1f}" for k in (1, 5, 10))
            + " |"
        )
    for label, r in (("all held-out queries", everything), ("all but flags", no_flags)):
        print(f"| **{label}** | | " + " | ".join(f"{100 * (r < k).mean():.1f}" for k in (1, 5, 10)) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": args.seeds, "kinds": table}, indent=1))


if __name__ == "__main__":
    main()
