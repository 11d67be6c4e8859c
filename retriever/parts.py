"""One shard folder written by N independent parts (torchrun ranks, SLURM array tasks, machines).

Items are cut into shards by position exactly as in a one-process run (shard k holds ids
[k·S, (k+1)·S)); part I of N owns the shards with k mod N = I. So the partition is a pure
function of the ids, the parts never coordinate, and together they write the rows a single
process writes. Each part names its files with its tag (`part-00007-p3of4.parquet`,
`_embed_job-p3of4.json`, `_errors-p3of4.jsonl`), so parts running at the same time in one folder
never touch each other's files and each resumes on its own after a kill.

Every part records its job (source digest, model, shard size, dtype, num_parts); a part whose job
differs from another part's in anything but the part number is refused, and `index` refuses a
folder until every part is complete (`missing_parts`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from retriever.errors import UserError

JOB_PREFIX = "_embed_job"
ERRORS_PREFIX = "_errors"
_TAG_RE = re.compile(r"-p(\d+)of(\d+)")
_JOB_RE = re.compile(r"^_embed_job-p(\d+)of(\d+)\.json$")


def check_part(part: int, num_parts: int) -> None:
    if num_parts < 1:
        raise UserError("--num-parts must be at least 1.")
    if not 0 <= part < num_parts:
        raise UserError(f"--part must be between 0 and {num_parts - 1} for --num-parts {num_parts}; got {part}.")


def tag(part: int, num_parts: int) -> str:
    return "" if num_parts == 1 else f"-p{part}of{num_parts}"


def owns(shard: int, part: int, num_parts: int) -> bool:
    return shard % num_parts == part


def shard_file(shard: int, part: int, num_parts: int) -> str:
    return f"part-{shard:05d}{tag(part, num_parts)}.parquet"


def job_file(part: int, num_parts: int) -> str:
    return f"{JOB_PREFIX}{tag(part, num_parts)}.json"


def errors_file(part: int, num_parts: int) -> str:
    return f"{ERRORS_PREFIX}{tag(part, num_parts)}.jsonl"


def errors_files(folder: Path) -> list[Path]:
    """The skipped-image lists of a shard folder: `_errors.jsonl`, or one per part."""
    return sorted(p for p in Path(folder).glob(f"{ERRORS_PREFIX}*.jsonl") if p.is_file())


def part_of_name(name: str) -> tuple[int, int] | None:
    """(part, num_parts) a file name carries, None for a one-process file."""
    m = _TAG_RE.search(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _jobs(folder: Path) -> dict[int, dict[str, Any]]:
    jobs = {}
    for p in folder.glob(f"{JOB_PREFIX}-p*of*.json"):
        m = _JOB_RE.match(p.name)
        if m:
            try:
                jobs[int(m.group(1))] = json.loads(p.read_text())
            except ValueError:
                continue  # a damaged job file: that part reads as not started
    return jobs


def _comparable(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in ("part", "retriever_version")}


def check_compatible(folder: Path, job: dict[str, Any]) -> None:
    """Refuse a part whose arguments differ from the folder's other parts (or a one-process run)."""
    if (folder / f"{JOB_PREFIX}.json").is_file():
        raise UserError(
            f"{folder} holds a one-process embed; a --num-parts run needs its own folder (or finish that run)."
        )
    for part, other in sorted(_jobs(folder).items()):
        if part == job["part"]:
            continue
        if other.get("num_parts") != job["num_parts"]:
            raise UserError(
                f"{folder} holds parts of a --num-parts {other.get('num_parts')} run; this is --num-parts "
                f"{job['num_parts']}: use the same --num-parts or a new --out."
            )
        if _comparable(other) != _comparable(job):
            diff = sorted(
                k
                for k in set(other) | set(job)
                if k not in ("part", "retriever_version") and other.get(k) != job.get(k)
            )
            raise UserError(
                f"Part {part} in {folder} was made with other arguments ({', '.join(diff)}); every part must use "
                "the same source, model, shard size and dtype."
            )


def parts_status(folder: str | Path) -> dict[str, Any] | None:
    """For a folder written in parts: which parts are complete, partial or not started; else None."""
    folder = Path(folder)
    jobs = _jobs(folder)
    if not jobs:
        return None
    any_job = next(iter(jobs.values()))
    n_parts = int(any_job["num_parts"])
    n_shards = (int(any_job["items"]) + int(any_job["shard_size"]) - 1) // int(any_job["shard_size"])
    present = {p.name for p in folder.glob("part-*.parquet")}
    complete, partial, missing = [], {}, []
    for part in range(n_parts):
        wanted = [shard_file(k, part, n_parts) for k in range(n_shards) if owns(k, part, n_parts)]
        have = sum(1 for w in wanted if w in present)
        if part in jobs and have == len(wanted):
            complete.append(part)
        elif part in jobs:
            partial[part] = f"{have} of {len(wanted)} shards"
        else:
            missing.append(part)
    return {"num_parts": n_parts, "shards": n_shards, "complete": complete, "partial": partial, "not_started": missing}


def missing_parts(folder: str | Path) -> None:
    """Refuse, in one sentence naming them, a folder whose parts are not all complete."""
    status = parts_status(folder)
    if status is None or len(status["complete"]) == status["num_parts"]:
        return
    bits = [f"part {p} ({s})" for p, s in status["partial"].items()] + [
        f"part {p} (not started)" for p in status["not_started"]
    ]
    raise UserError(
        f"{folder} is missing parts of its --num-parts {status['num_parts']} embed: {', '.join(bits)}; "
        "run `retriever embed ... --num-parts N --part I` for each before indexing."
    )
