"""``benchmarks/README.md`` is shared: each benchmark owns some ``## `` sections of it and rewrites only those.

    readme.update_section("## bench_speed", body)              # heading line + blank line + body
    readme.read_section("## bench_speed")                        # the body now there, or None

A section runs from its heading line (matched exactly) to the next line starting with ``"## "`` (or the end), so
``## bench_quality`` and ``## bench_quality: prompt length`` are two sections. A missing section is appended.

API:

- `update_section(heading, body, readme=README)`: replace (or append) the section; the file is re-read under an
  exclusive lock (``README.md.lock``, fcntl) right before writing and replaced atomically, so two benchmarks
  finishing at once both keep their sections.
- `read_section(heading, readme=README)` -> the body (without the heading and surrounding blank lines) or None.
- `section_bounds(lines, heading)` -> (begin, end) line indices of the section, or None.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from . import README
from .report import write_text

__all__ = ["read_section", "section_bounds", "update_section"]


def section_bounds(lines: list[str], heading: str) -> tuple[int, int] | None:
    heads = [i for i, line in enumerate(lines) if line.rstrip("\n") == heading]
    if not heads:
        return None
    begin = heads[0]
    end = next((i for i in range(begin + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return begin, end


@contextlib.contextmanager
def _locked(readme: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, still an atomic replace
        yield
        return
    with open(readme.with_name(readme.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_section(heading: str, body: str, readme: Path | str = README) -> None:
    readme = Path(readme)
    block = f"{heading}\n\n{body.strip()}\n"
    with _locked(readme):
        text = readme.read_text() if readme.exists() else "# Benchmarks\n"
        lines = text.splitlines(keepends=True)
        bounds = section_bounds(lines, heading)
        if bounds is None:
            text = text.rstrip("\n") + "\n\n" + block
        else:
            begin, end = bounds
            tail = "".join(lines[end:])
            text = "".join(lines[:begin]) + block + ("\n" + tail if tail else "")
        write_text(readme, text)


def read_section(heading: str, readme: Path | str = README) -> str | None:
    readme = Path(readme)
    if not readme.exists():
        return None
    lines = readme.read_text().splitlines(keepends=True)
    bounds = section_bounds(lines, heading)
    if bounds is None:
        return None
    begin, end = bounds
    return "".join(lines[begin + 1 : end]).strip("\n")
