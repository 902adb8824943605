"""The one writer of output folders and files (quantize, export, convert, consolidate, prune, distill).

Rules, so that no command ever loses a user's data:
- A destination that exists and is not empty is refused before any work, in one line (exit 2).
- `overwrite=True` may replace only a previous output *of the same command* (it carries a marker
  file naming the command); a run folder, a training checkpoint or anything else is never replaced.
- Everything is written into a hidden temp folder beside the destination, fsynced, given a
  manifest, and renamed into place; on any failure the temp folder is removed and the destination
  is exactly as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from llmstack.checkpoint import MANIFEST, disk_errno, fsync_dir, write_manifest
from llmstack.errors import UserError

OUTPUT_MARKER = ".llmstack_output.json"


class OutputError(UserError):
    """A destination that cannot be written without losing something."""


def _describe(folder: Path) -> str:
    if (folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").exists():
        return "a training run folder"
    if (folder / "trainer_state.json").exists():
        return "a training checkpoint"
    return "a folder that is not empty"


def previous_output_of(path: Path) -> str | None:
    """The command that wrote `path` (a folder with our marker), else None."""
    marker = path / OUTPUT_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text()).get("command")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def check_destination(dst: str | Path, *, command: str, overwrite: bool = False, is_file: bool = False) -> Path:
    """Refuse, before any work, a destination whose writing would lose data. Returns the Path."""
    dst = Path(dst)
    flag = f"llmstack {command}"
    if is_file:
        if dst.is_dir():
            raise OutputError(f"{dst}: is a folder; {flag} writes a file here")
        if dst.exists() and not overwrite:
            raise OutputError(f"{dst}: exists; choose a new path (or pass --overwrite to replace this file)")
    elif dst.exists():
        if not dst.is_dir():
            raise OutputError(f"{dst}: exists and is a file; choose a new output folder")
        if any(dst.iterdir()):
            wrote = previous_output_of(dst)
            if not overwrite or wrote != command:
                hint = (" (pass --overwrite to replace it)" if wrote == command else
                        f" ({_describe(dst)}; --overwrite only replaces an earlier output of {flag})"
                        if overwrite else "")
                raise OutputError(f"{dst}: exists and is not empty; choose a new output folder{hint}")
    parent = _existing_parent(dst)
    if not parent.is_dir():
        raise OutputError(f"{parent}: is a file, not a folder; cannot write {dst}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: not writable; cannot write {dst}")
    return dst


def _existing_parent(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _disk_error(code: int, dst: Path) -> OutputError:
    return OutputError(f"{dst}: {os.strerror(code).lower()} while writing; the partial output was removed and "
                       f"nothing was changed at {dst}")


@contextmanager
def atomic_output_dir(dst: str | Path, *, command: str, overwrite: bool = False,
                      manifest: bool = True) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it replaces `dst` atomically (with a manifest)."""
    dst = check_destination(dst, command=command, overwrite=overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"command": command}) + "\n")
        if manifest:
            write_manifest(tmp)
        _publish(tmp, dst)
    except (OSError, SafetensorError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_errno(e) is not None:
            raise _disk_error(disk_errno(e), dst) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, dst: Path) -> None:
    old = None
    if dst.exists():  # empty, or an earlier output of the same command (checked above)
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
    os.rename(tmp, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output_file(dst: str | Path, *, command: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder; the file written there under `dst.name` (plus any side files it names,
    e.g. ONNX external data) is moved to `dst`'s folder when the block succeeds."""
    dst = check_destination(dst, command=command, overwrite=overwrite, is_file=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        produced = sorted(p for p in tmp.iterdir() if p.name != MANIFEST)
        if not (tmp / dst.name).is_file():
            raise OutputError(f"{dst}: the command wrote no {dst.name}")
        clashes = [p.name for p in produced if p.name != dst.name and (dst.parent / p.name).exists()]
        if clashes and not overwrite:
            raise OutputError(f"{dst.parent / clashes[0]}: exists; choose a new path (or pass --overwrite)")
        for p in produced:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        for p in produced:  # side files first, the named file last: it appears only when complete
            if p.name != dst.name:
                os.replace(p, dst.parent / p.name)
        os.replace(tmp / dst.name, dst)
        fsync_dir(dst.parent)
    except (OSError, SafetensorError, RuntimeError) as e:
        if disk_errno(e) is not None:
            raise _disk_error(disk_errno(e), dst) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
