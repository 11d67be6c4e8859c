"""One writer per folder: an OS file lock that the kernel releases when its holder dies.

Every command that writes an index (a build over it, `--add`) or a shard folder (`embed`) holds
`folder_lock` for the whole write. A second writer is refused with one sentence naming the holder's
pid, or, with `wait=True`, waits for it. Because a crashed holder's lock is released by the kernel
(`fcntl.flock` is tied to the open file, not to a file's existence), a lock never goes stale, and
whatever temp files a writer finds under the lock were left by a dead process, so cleaning them is
safe.

Where the lock file lives: a folder written in place (a shard folder) keeps it inside
(`FOLDER/.retriever.lock`); a folder replaced as a whole by a rename (an index, a checkpoint; see
atomic.atomic_dir) keeps it beside (`PARENT/.FOLDER.lock`), because a lock file inside would be
swapped away with the old folder while a waiting writer still holds it open.

A writer of a share of a folder locks only that share: part I of N of an embed in parts
(`FOLDER/.retriever-pIofN.lock`, see parts.py) writes only its own part-tagged files, so parts run
side by side while two writers of one part still exclude each other; the quantizer training of a
partitioned index build takes `INDEX.parts/.retriever-train.lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from retriever.errors import UserError

INSIDE_NAME = ".retriever.lock"


def lock_file_for(folder: str | os.PathLike, *, inside: bool, tag: str = "") -> Path:
    """The lock file of `folder`, or of the share of it named by `tag` (a part's `-pIofN`)."""
    folder = Path(folder).expanduser()
    if inside:
        return folder / (INSIDE_NAME.removesuffix(".lock") + f"{tag}.lock")
    return folder.parent / f".{folder.name}{tag}.lock"


@contextlib.contextmanager
def folder_lock(
    folder: str | os.PathLike,
    *,
    inside: bool,
    wait: bool = False,
    on_wait: Callable[[str], None] | None = None,
    what: str = "writing",
    tag: str = "",
) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` for the duration of the block.

    Args:
        folder: the folder about to be written.
        inside: keep the lock file inside `folder` (written in place) or beside it (replaced by rename).
        wait: block until the holder finishes instead of refusing.
        on_wait: called once with a sentence when we have to wait (for the CLI to print).
        what: what the holder is doing, for the messages ("writing", "embedding into", …).
        tag: lock only this writer's share of the folder: part I of N of an embed in parts passes
            its `-pIofN`, so parts writing their own files run side by side while two writers of
            one part still exclude each other. "" (the default) locks the whole folder.
    """
    path = lock_file_for(folder, inside=inside, tag=tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                share = f" (part {tag.lstrip('-')})" if tag else ""
                raise UserError(
                    f"{Path(folder)}{share} is being written by another retriever process ({holder}); "
                    "wait for it to finish, or pass --wait to queue behind it."
                ) from None
            if on_wait:
                on_wait(f"Waiting for another retriever process ({holder}) to finish {what} {Path(folder)}…")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock; a killed process's is released by the kernel the same way


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"
