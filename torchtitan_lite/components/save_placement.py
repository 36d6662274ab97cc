"""Where a checkpoint save is written, and where it ends up when something is in the way.

A save is written into ``step-N.tmp/`` and renamed to ``step-N/`` once every rank is done
(atomic: a step folder appears complete or not at all). Nothing a run did not write is
deleted, and nothing in the way loses the trained step:

- a ``step-N.tmp`` left by a killed save is removed; one that is a file or a link (no save's
  folder), or that cannot be removed, is kept, and the save goes through ``step-N.tmp-2``
  (``-3``, ...) instead;
- a folder that holds the step's name is moved aside under a name that says why
  (``step-N.corrupt`` / ``.incomplete`` / ``.replaced``); where it cannot be moved, or the
  rename onto ``step-N`` fails, the save is kept beside it as ``step-N.new`` (``.new-2``,
  ...), which :func:`~torchtitan_lite.components.dcp_format.step_folders` lists as step N.

The log says that something was removed or moved only where it was.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from torchtitan_lite.components.dcp_format import (
    MANIFEST,
    CheckpointError,
    beside,
    is_complete,
    saves_of_step,
    step_folders,
)
from torchtitan_lite.logging import logger

#: A save's temporary folder: ``step-N.tmp``, or ``step-N.tmp-K`` where something that could
#: not be removed was in the way.
_TMP = re.compile(r"^step-\d+\.tmp(-\d+)?$")


def move_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to ``<path>.<why>`` (``.<why>-2``, ... when taken); returns the new path."""
    target, n = path.with_name(f"{path.name}.{why}"), 1
    while os.path.lexists(target):  # a dangling link is taken too
        n += 1
        target = path.with_name(f"{path.name}.{why}-{n}")
    path.rename(target)
    return target


def _remove_unfinished(path: Path) -> str | None:
    """Delete ``path``, the temporary folder of a save that never finished; returns why it is
    still there (None: it is gone). A file or a link of that name is no save's folder, and
    is kept."""
    if path.is_symlink() or not path.is_dir():
        return "it is a file or a link, not a save's folder, so it is kept"
    try:
        shutil.rmtree(path)
    except OSError as e:
        return f"it could not be removed: {e.strerror or e} ({e.filename or path})"
    return None


def clear_unfinished(folder: Path) -> None:
    """Remove the temporary folders of saves that never finished (a run killed while
    saving), saying which could not be removed."""
    for tmp in sorted(p for p in folder.iterdir() if _TMP.match(p.name)):
        kept = _remove_unfinished(tmp)
        if kept is None:
            logger.warning(
                f"checkpoint: removed {tmp}, an unfinished save of an earlier run (it was "
                "never complete)"
            )
        else:
            logger.warning(
                f"checkpoint: {tmp} is still there ({kept}); a save of its step goes into "
                "another temporary folder beside it"
            )


def new_tmp(folder: Path, step: int) -> Path:
    """A new, empty temporary folder for a save of ``step``: ``step-N.tmp`` once an
    unfinished save there is removed, else the first ``step-N.tmp-K`` beside it that is free
    or can be cleared."""
    tmp, n = folder / f"step-{step}.tmp", 1
    while os.path.lexists(tmp):
        kept = _remove_unfinished(tmp)
        if kept is None:
            logger.warning(f"checkpoint: removed {tmp}, an unfinished save")
            break
        n += 1
        other = folder / f"step-{step}.tmp-{n}"
        logger.warning(f"checkpoint: {tmp} is in the way ({kept}); saving into {other}")
        tmp = other
    tmp.mkdir(parents=True)
    return tmp


def put_in_place(tmp: Path, final: Path, step: int, load_error: str | None) -> Path:
    """Rename the finished save ``tmp`` to ``final`` once what holds the step's name is moved
    aside; where something cannot be moved, or the rename fails, keep it beside them as
    ``step-N.new[-K]``. Returns where the save is. ``load_error``: why the folder of ``step``
    that the run tried to resume from failed to load (it is set aside as corrupt)."""
    folder = final.parent
    listed = step_folders(folder).get(step)
    in_the_way = saves_of_step(folder, step)
    if os.path.lexists(final) and final not in in_the_way:  # a file or a link
        in_the_way.insert(0, final)
    stuck = []
    for path in in_the_way:
        if load_error is not None and path == listed:
            why, what = "corrupt", f"it failed to load ({load_error})"
        elif not is_complete(path):
            why, what = "incomplete", f"it has no .metadata or {MANIFEST}"
        else:
            why, what = "replaced", "this run resumed from an earlier step and saved it again"
        try:
            aside = move_aside(path, why)
        except OSError as e:
            stuck.append(f"{path} could not be moved aside: {e.strerror or e}")
            continue
        logger.warning(f"checkpoint: {path} was already there ({what}); moved to {aside}")
    for target in ([] if stuck else [final]) + [beside(folder, step)]:
        try:
            tmp.rename(target)
        except OSError as e:
            stuck.append(f"{tmp} could not be renamed to {target}: {e.strerror or e}")
            continue
        if target != final:
            logger.warning(
                f"checkpoint: step {step} is saved as {target}, not {final} "
                f"({'; '.join(stuck)}); a resume loads it as step {step}"
            )
        return target
    raise CheckpointError(
        f"The save of step {step} is complete in {tmp}, but it cannot be put in place "
        f"({'; '.join(stuck)}). Fix: make {folder} writable, then rename {tmp} to {final} "
        f"before the next run (a run removes {tmp.name} as an unfinished save)."
    )
