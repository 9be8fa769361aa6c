"""All-or-nothing directory writes under a lock, with recovery of a write that was killed halfway.

A write stages every file in a hidden sibling directory (``.NAME.staging-*``), syncs it, writes a commit record into
it (under another name, then renamed: a torn record never counts), then moves the staged files into the target one `os.replace` at a time. The commit record is the commit point:

* killed before it: the staging directory is garbage and the target is untouched (the previous version stays);
* killed after it: the next reader or writer finds the committed staging directory and finishes the moves (roll
  forward), so the target becomes the new version.

The target directory itself is never renamed away (its inode stays, so a process whose working directory it is keeps
working, and a reader never finds it missing), and files the write does not name are left alone ("overlay", what
`save_pretrained` into a Trainer's output directory needs) unless the caller asks to "replace" the directory.

Writers and readers take the same lock file (``.NAME.lock`` beside the target, via `filelock`, which the HF stack
already uses), so concurrent writers are serialised and a reader never sees a half-moved version. A reader that
cannot create the lock file (a read-only location) reads without it: nobody can be writing there either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Literal

from filelock import FileLock, Timeout

from .constants import LOCK_TIMEOUT_ENV

logger = logging.getLogger(__name__)

WriteMode = Literal["create", "overlay", "replace", "keep"]
WRITE_MODES = ("create", "overlay", "replace", "keep")
COMMIT_RECORD = ".commit.json"
DEFAULT_LOCK_TIMEOUT_S = 300.0

_locks: dict[str, FileLock] = {}
_locks_guard = threading.Lock()
_active = threading.local()  # staging directories of this thread's open transactions
os.register_at_fork(after_in_child=_locks.clear)  # filelock refuses a lock object inherited across fork
STAGING = ".staging-"  # .NAME.staging-XXXXXXXX beside the target (mkdtemp's 8 random characters)
_RANDOM = re.compile(r"[a-z0-9_]{8}")


def _names(target: str) -> tuple[str, str]:
    parent, name = os.path.split(target)
    return parent, name


def normalize(target: str | os.PathLike) -> str:
    """Absolute, symlinks resolved: staging then sits on the target's own filesystem (renames stay atomic)."""
    return os.path.realpath(os.path.abspath(os.fspath(target)))


def lock_file(target: str) -> str:
    parent, name = _names(target)
    return os.path.join(parent, f".{name}.lock")


def _lock(target: str) -> FileLock:
    """One FileLock object per path and process, so nested use (a read inside a write) is reentrant."""
    path = lock_file(target)
    with _locks_guard:
        if path not in _locks:
            timeout = float(os.environ.get(LOCK_TIMEOUT_ENV) or DEFAULT_LOCK_TIMEOUT_S)
            _locks[path] = FileLock(path, timeout=timeout)
        return _locks[path]


@contextlib.contextmanager
def locked(target: str, *, for_reading: bool = False) -> Iterator[bool]:
    """Hold the target's lock (yields True); a reader that can't create the lock file (a read-only location)
    goes without (yields False)."""
    lock = _lock(target)
    try:
        lock.acquire()
    except Timeout:
        raise TimeoutError(
            f"{target} is locked by another process (lock file {lock.lock_file}) and stayed so for {lock.timeout:.0f} s; "
            f"if no process is writing it, raise ${LOCK_TIMEOUT_ENV} or check that process."
        ) from None
    except OSError as err:
        if not for_reading:
            raise
        logger.debug("Reading %s without a lock (%s).", target, err)
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _fsync(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _seal(path: str, file_mode: int) -> None:
    """Give every staged file the umask's mode (writers that stage via mkstemp leave 0600) and sync it all."""
    for root, _, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, file_mode)
            _fsync(file)
        _fsync(root)


def _staging_prefix(target: str) -> str:
    return f".{os.path.basename(target)}{STAGING}"


def _staging_dirs(target: str) -> list[str]:
    """This target's staging directories (exactly ours: a sibling named NAME.staging-x has its own longer names)."""
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        return []
    prefix = _staging_prefix(target)
    found = [
        os.path.join(parent, d)
        for d in os.listdir(parent)
        if d.startswith(prefix) and _RANDOM.fullmatch(d[len(prefix) :])
    ]
    return sorted((d for d in found if os.path.isdir(d) and not os.path.islink(d)), key=os.path.getmtime)


def _commit_record(staging: str) -> dict | None:
    """The staging directory's commit record, or None when it has none or an unreadable one (not committed:
    the record is written under another name and renamed into place, so a torn one can only be a stray)."""
    try:
        with open(os.path.join(staging, COMMIT_RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("remove"), list) else None


def _merge(src: str, dst: str) -> None:
    """Move every entry of `src` into `dst` (directories merged, files replaced one atomic rename at a time)."""
    os.makedirs(dst, exist_ok=True)
    for entry in sorted(os.listdir(src)):
        if entry.startswith(COMMIT_RECORD):
            continue
        source, dest = os.path.join(src, entry), os.path.join(dst, entry)
        dest_is_dir = os.path.isdir(dest) and not os.path.islink(dest)
        if os.path.isdir(source) and not os.path.islink(source):
            if os.path.lexists(dest) and not dest_is_dir:
                os.remove(dest)
            _merge(source, dest)
            os.rmdir(source)
            continue
        if dest_is_dir:
            shutil.rmtree(dest)
        os.replace(source, dest)
    _fsync(dst)


def _remove(target: str, names: list[str]) -> None:
    for entry in names:
        path = os.path.join(target, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _roll_forward(staging: str, target: str, record: dict) -> None:
    _merge(staging, target)
    _remove(target, [str(entry) for entry in record["remove"]])
    _fsync(target)
    shutil.rmtree(staging, ignore_errors=True)


def recover(target: str | os.PathLike) -> None:
    """Finish a committed write that was killed halfway and delete staging left by killed writers. Call it with the
    target's lock held (readers and writers here do)."""
    target = normalize(target)
    for staging in _staging_dirs(target):
        record = _commit_record(staging)
        if record is not None:
            logger.warning("Completing an interrupted write of %s from %s.", target, staging)
            _roll_forward(staging, target, record)
        else:
            logger.info("Removing staging left by an interrupted write: %s", staging)
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def reading(target: str | os.PathLike) -> Iterator[str]:
    """Read `target` consistently: with its lock held and any interrupted write finished first."""
    target = normalize(target)
    with locked(target, for_reading=True) as held:
        if held and os.access(os.path.dirname(target), os.W_OK):
            recover(target)  # only with the lock: a live writer's staging must never look abandoned
        yield target


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.listdir(path)


def _check_mode(target: str, mode: WriteMode) -> None:
    if mode not in WRITE_MODES:
        raise ValueError(f"mode must be one of {WRITE_MODES}, got {mode!r}.")
    if os.path.lexists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target} exists and is not a directory.")
    if mode == "create" and os.path.isdir(target) and os.listdir(target):
        raise FileExistsError(f"{target} is not empty; pass overwrite=True (--overwrite) to replace it.")


def _publish(staging: str, target: str, mode: WriteMode, removable: Callable[[str], bool] | None) -> None:
    if not os.path.lexists(target):
        os.replace(staging, target)  # nothing there: one rename publishes everything
        _fsync(os.path.dirname(target))
        return
    if mode == "keep" and not _is_empty_dir(target):
        logger.info("%s was created meanwhile by another process; keeping it and discarding ours.", target)
        return
    staged = set(os.listdir(staging))
    remove = []
    if mode == "replace":
        remove = sorted(e for e in set(os.listdir(target)) - staged if removable is None or removable(e))
    record = {"mode": mode, "remove": remove}
    part = os.path.join(staging, COMMIT_RECORD + ".part")
    with open(part, "w", encoding="utf-8") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, os.path.join(staging, COMMIT_RECORD))
    _fsync(staging)  # the commit point: from here on recovery rolls forward
    _roll_forward(staging, target, record)


@contextlib.contextmanager
def transaction(
    target: str | os.PathLike,
    mode: WriteMode = "create",
    *,
    dir_mode: int | None = None,
    removable: Callable[[str], bool] | None = None,
) -> Iterator[str]:
    """Yield a staging directory; when the block succeeds its files become `target`'s, atomically.

    `mode`: ``"create"`` refuses a non-empty target; ``"overlay"`` replaces the staged files and keeps the others;
    ``"replace"`` also deletes the target's entries that were not staged (those `removable` accepts; the caller
    decides that this is safe); ``"keep"`` keeps a target that appeared meanwhile (first writer wins, for caches).
    `dir_mode` sets the permissions of a newly created target (default: what the umask gives)."""
    target = normalize(target)
    open_stagings = getattr(_active, "dirs", set())
    if any(target == d or target.startswith(d + os.sep) for d in open_stagings):
        os.makedirs(target, exist_ok=True)  # inside an open transaction: its commit publishes this too
        yield target
        return
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    with locked(target):
        recover(target)
        _check_mode(target, mode)
        staging = tempfile.mkdtemp(prefix=_staging_prefix(target), dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        if dir_mode is None:
            dir_mode = 0o777 & ~umask
        os.chmod(staging, dir_mode)  # mkdtemp makes 0700
        _active.dirs = open_stagings | {staging}
        try:
            yield staging
            _seal(staging, 0o666 & ~umask)
            _publish(staging, target, mode, removable)
        finally:
            _active.dirs = open_stagings
            if _commit_record(staging) is None:  # committed: recovery must finish it
                shutil.rmtree(staging, ignore_errors=True)
