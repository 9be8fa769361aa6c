"""All-or-nothing directory writes: adapters, exports, checkpoints and the converted model cache.

Everything is written into a hidden staging directory beside the target, synced, then published with renames, so
an interrupted write (crash, Ctrl-C, a dead rank) leaves either the previous directory or the new one, never a
half-written mix. One implementation serves every writer in the package.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Literal

logger = logging.getLogger(__name__)

IfExists = Literal["error", "replace", "keep"]


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError), open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def restore_interrupted(target: str) -> None:
    """If a crash struck between the two renames of a replace, put the previous directory back."""
    parent, name = os.path.split(os.path.abspath(target))
    if os.path.exists(target) or not os.path.isdir(parent):
        return
    backups = sorted(
        (os.path.join(parent, d) for d in os.listdir(parent) if d.startswith(f".{name}.old-")),
        key=os.path.getmtime,
    )
    if backups:
        logger.warning("Restoring %s from %s (a previous write was interrupted).", target, backups[-1])
        os.rename(backups[-1], target)


def _check_target(target: str, if_exists: IfExists) -> None:
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"Output path {target!r} exists and is not a directory.")
    if if_exists == "error" and os.path.isdir(target) and os.listdir(target):
        raise FileExistsError(f"Output directory {target!r} is not empty; pass overwrite=True (--overwrite) to replace it.")


def _publish(staging: str, target: str, if_exists: IfExists) -> None:
    if not os.path.exists(target) or (os.path.isdir(target) and not os.listdir(target)):
        with contextlib.suppress(OSError):
            os.replace(staging, target)  # a missing or empty target is replaced in one rename
            return
    if if_exists == "keep" and os.path.isdir(target):
        logger.info("%s was created concurrently by another process; keeping it and discarding ours.", target)
        return
    if if_exists == "error":
        raise FileExistsError(f"Output directory {target!r} became non-empty while writing; not replacing it.")
    parent, name = os.path.split(target)
    backup = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rmdir(backup)
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(backup, target)
        raise
    _fsync_dir(parent)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, if_exists: IfExists = "error", mode: int | None = None) -> Iterator[str]:
    """Yield a staging directory that becomes `target` when the block succeeds and vanishes when it fails.

    `if_exists`: ``"error"`` refuses a non-empty target, ``"replace"`` swaps it out (the old one is restored if a
    crash hits between the renames), ``"keep"`` keeps a target that appeared meanwhile (first writer wins, for
    caches). `mode` sets the published directory's permissions (default: the umask's)."""
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    restore_interrupted(target)
    _check_target(target, if_exists)
    if if_exists == "replace":  # a single writer (checkpoints): staging left by a killed write is garbage
        for stale in os.listdir(parent):
            if stale.startswith(f".{name}.tmp-"):
                shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o777 & ~umask
    os.chmod(staging, mode)  # mkdtemp makes 0700
    try:
        yield staging
        _fsync_tree(staging)
        _publish(staging, target, if_exists)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
