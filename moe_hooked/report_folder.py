"""Where a report is written: checks on the output folder, and the move that puts a finished
report in place without ever deleting anything that is not a moe-hooked report.

A report is built in a new temporary folder beside the target (:func:`build_folder`) and moved
into place at the end (:func:`publish`). Without `overwrite` nothing that exists at the target,
whenever it appeared, is replaced; with `overwrite` only a folder that holds a report (or nothing)
at the moment of replacement is: it is moved aside, the new report moved in, then the old deleted.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

METADATA_FILE = "report.json"
"""Written last; its presence marks a folder as a report that `overwrite` may replace."""


class ReportError(ValueError):
    """A report input is unusable (output folder, corpus, model, option); nothing was computed."""


def check_out(out: str | Path, overwrite: bool) -> Path:
    """The absolute output folder, if a report may be written there now; else a `ReportError`."""
    out = Path(out).expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise ReportError(f"output path {out} exists and is a file: choose another --out")
        if not overwrite:
            raise ReportError(f"output folder {out} already exists: pass --overwrite (overwrite=True) to replace it, or choose another --out")
        _check_replaceable(out, out)
    if not out.parent.is_dir():
        raise ReportError(f"the parent folder of the output, {out.parent}, does not exist")
    return out


def _check_replaceable(folder: Path, out: Path) -> None:
    if any(folder.iterdir()) and not (folder / METADATA_FILE).is_file():
        raise ReportError(
            f"output folder {out} is not empty and holds no {METADATA_FILE}, so it is not a moe-hooked "
            "report: it will not be replaced even with --overwrite; choose another --out"
        )


def build_folder(out: Path) -> Path:
    """A new, empty, hidden folder beside `out` to build the report in."""
    folder = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    folder.mkdir()
    return folder


def publish(folder: Path, out: Path, overwrite: bool) -> None:
    """Move the finished report `folder` to `out` (see the module docstring).

    Raises `ReportError` (leaving `folder` where it is, and any folder at `out` untouched)
    when `out` exists and may not be replaced.
    """
    aside = None
    if overwrite:
        aside = _move_aside(out)
    try:
        _move_without_replacing(folder, out, "the new report")
    except ReportError:
        if aside is not None:
            _move_without_replacing(aside, out, "the earlier report")
        raise
    if aside is not None:
        shutil.rmtree(aside)


def _move_aside(out: Path) -> Path | None:
    """Move the report at `out` to a hidden sibling and return it (None if `out` does not exist)."""
    aside = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(out, aside)
    except FileNotFoundError:
        return None
    except NotADirectoryError as err:
        raise ReportError(f"output path {out} is now a file: it was not replaced") from err
    try:
        _check_replaceable(aside, out)
    except ReportError:
        _move_without_replacing(aside, out, "that folder")
        raise
    return aside


def _move_without_replacing(source: Path, out: Path, what: str) -> None:
    """Rename `source` (`what`, for messages) to `out`, failing if anything exists at `out`.

    `out` is first created as an empty folder (an exclusive creation); renaming onto an empty
    folder replaces it, onto anything else fails, so whatever another process puts at `out`
    meanwhile is never replaced.
    """
    problem = f"{out} appeared while the report was being written (another report or program created it)"
    try:
        out.mkdir()
        os.rename(source, out)
    except FileExistsError:
        pass
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        problem = f"{out} was filled by another program while the report was being moved there"
    else:
        return
    raise ReportError(f"{problem}; it was not replaced; {what} is kept at {source}: move it yourself or use another --out")
