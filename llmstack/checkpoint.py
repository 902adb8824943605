"""Atomic, verifiable checkpoints.

Layout: `<out_dir>/checkpoints/step_<N>/` holding
  model.safetensors        weights (tensors only through safetensors, never pickle)
  optimizer.safetensors    optimizer state tensors, keyed by parameter name
  rng.safetensors          torch RNG states (CPU and CUDA)
  trainer_state.json       step, data position, python/numpy RNG, optimizer hyper-parameters
  config.yaml              the resolved config
  tokenizer files          so a checkpoint is self-contained
  manifest.json            size and sha256 of every file, written last inside the folder
and `<out_dir>/checkpoints/latest`, a one-line pointer updated only after the folder is complete.

A save writes into `step_<N>.tmp`, fsyncs every file, renames the folder and then the pointer:
a crash at any moment leaves the previous checkpoint and pointer intact.
"""
from __future__ import annotations

from llmstack import jsonio
from llmstack.errors import UserError

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
_DISK_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
log = logging.getLogger("llmstack")


class CheckpointError(UserError):
    """A missing, corrupt or mismatched checkpoint; the message is one line naming the file."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
    (folder / MANIFEST).write_text(jsonio.dumps({"files": entries}, indent=1))
    for p in files + [folder / MANIFEST]:
        _fsync_file(p)


def disk_errno(e: BaseException) -> int | None:
    """ENOSPC/EFBIG/EDQUOT behind an exception, also when a library (safetensors' Rust writer,
    torch.save) turned the OSError into its own error type with the code in the message."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else next((c for c in _DISK_ERRORS if os.strerror(c) in str(e)), None)
    return code if code in _DISK_ERRORS else None


def _manifest_entries(folder: Path) -> dict:
    manifest = folder / MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST}; the checkpoint is incomplete or was not written by llmstack")
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{manifest}: unreadable manifest") from None
    if not isinstance(entries, dict) or not entries:
        raise CheckpointError(f"{manifest}: lists no files")
    for rel, info in entries.items():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise CheckpointError(f"{manifest}: malformed entry for {rel!r} (needs bytes and sha256)")
        if not is_inside(folder, folder / rel):
            raise CheckpointError(f"{manifest}: entry {rel!r} points outside {folder}")
    return entries


def is_inside(folder: Path, path: Path) -> bool:
    """True if `path` (after resolving links and ..) stays inside `folder`."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


_verified: set[tuple[str, int]] = set()  # (folder, manifest mtime) already checked in this process


def verify(folder: Path) -> None:
    """Every file the manifest lists has its size and checksum, and every tensor file is listed."""
    entries = _manifest_entries(folder)
    key = (str(Path(folder).resolve()), (folder / MANIFEST).stat().st_mtime_ns)
    if key in _verified:
        return
    for rel, info in entries.items():
        p = folder / rel
        if not p.exists():
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        if p.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{p}: size {p.stat().st_size} bytes, manifest says {info['bytes']} (truncated or altered)")
        if sha256(p) != info["sha256"]:
            raise CheckpointError(f"{p}: checksum differs from the manifest (altered or corrupt)")
    unlisted = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")
                      if p.relative_to(folder).as_posix() not in entries)
    if unlisted:
        raise CheckpointError(f"{folder / unlisted[0]}: tensor file not in the manifest (added after the save?)")
    _verified.add(key)


def checkpoints_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


_STEP_NAME = re.compile(r"step_(\d+)")


def saved_steps(out_dir: Path) -> list[Path]:
    """Published checkpoint folders of a run, newest first (temp folders excluded)."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and _STEP_NAME.fullmatch(p.name)]
    return sorted(steps, key=lambda p: int(p.name.split("_")[1]), reverse=True)


def _pointer_target(out_dir: Path) -> tuple[Path | None, str | None]:
    """(folder the `latest` pointer names, or None; why it is unusable, or None)."""
    pointer = checkpoints_dir(out_dir) / "latest"
    if not pointer.exists():
        return None, None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (UnicodeDecodeError, OSError):
        return None, f"{pointer}: not a text pointer"
    if not _STEP_NAME.fullmatch(name):  # a bare folder name: never a path out of checkpoints/
        return None, f"{pointer}: names {name[:60]!r}, not a step_N folder"
    target = checkpoints_dir(out_dir) / name
    if not target.is_dir():
        return None, f"{pointer}: names {name}, which does not exist"
    return target, None


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The run's newest usable checkpoint: the `latest` pointer's if it verifies, else the newest
    checkpoint that verifies (with a warning). None only if the run has no checkpoint at all; a run
    whose checkpoints all fail verification is an error, never a fresh start."""
    target, problem = _pointer_target(out_dir)
    if target is not None:
        try:
            verify(target)
            return target
        except CheckpointError as e:
            problem = str(e)
    steps = saved_steps(out_dir)
    if not steps and problem is None:
        return None
    for folder in steps:
        if folder == target:
            continue
        try:
            verify(folder)
        except CheckpointError:
            continue
        if problem is not None:
            log.warning("%s; using %s, the newest checkpoint that verifies", problem, folder.name)
        return folder
    why = problem or "no checkpoint verifies"
    raise CheckpointError(f"{checkpoints_dir(out_dir)}: {why}, and no other checkpoint there verifies; "
                          "refusing to start over on top of them (choose a new out_dir)")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's out_dir meaning its latest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    if (p / "model.safetensors").exists() or (p / MANIFEST).exists() or (p / "trainer_state.json").exists():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p}: neither a checkpoint folder nor a run folder with checkpoints/latest")
    return latest


def atomic_save(out_dir: Path, step: int, write: Callable[[Path], None], *, keep_last: int,
                is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> Path:
    """Run `write(tmp_folder)` (collective when distributed), then publish the folder atomically.
    A full disk or a file-size limit leaves the previous checkpoint and pointer as they were."""
    root = checkpoints_dir(out_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    try:
        if is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        write(tmp)
        barrier()
        if is_main:
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(root)
            pointer_tmp = root / "latest.tmp"
            pointer_tmp.write_text(final.name + "\n")
            _fsync_file(pointer_tmp)
            os.replace(pointer_tmp, root / "latest")
            fsync_dir(root)
            prune(root, keep_last, keep=final.name)
    except (OSError, SafetensorError, RuntimeError) as e:
        code = disk_errno(e)
        if code is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        (root / "latest.tmp").unlink(missing_ok=True)
        target, _ = _pointer_target(out_dir)
        kept = f"the previous checkpoint {target.name} is intact" if target else "no earlier checkpoint exists"
        raise CheckpointError(f"{root}: {os.strerror(code).lower()} while saving step {step}; "
                              f"the partial step_{step}.tmp was removed and {kept}") from None
    barrier()
    return final


def prune(root: Path, keep_last: int, keep: str) -> None:
    steps = sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")),
                   key=lambda p: int(p.name.split("_")[1]))
    for old in steps[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        if stale.name != f"{keep}.tmp":
            shutil.rmtree(stale, ignore_errors=True)


# --- state pieces ------------------------------------------------------------------------------

def save_model(model: torch.nn.Module, folder: Path, filename: str = "model.safetensors") -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # tied weights appear twice in state_dict; safetensors refuses shared storage, so keep one name
    seen, unique = {}, {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.dtype)
        if v.numel() and key in seen:
            continue
        seen[key] = k
        unique[k] = v
    save_file(unique, str(folder / filename), metadata={"format": "llmstack"})


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None


def load_model_state(model: torch.nn.Module, path: Path) -> None:
    """Load weights with strict, one-line errors naming the first bad tensor."""
    tensors = load_tensors(path)
    own = model.state_dict()
    tied = {k for k in own if k not in tensors and getattr(model.cfg, "tie_embeddings", False) and k == "output.weight"}
    for k, v in own.items():
        if k in tied:
            continue
        if k not in tensors:
            raise CheckpointError(f"{path}: missing tensor {k} (expected shape {tuple(v.shape)})")
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, the config expects {tuple(v.shape)}")
    extra = sorted(set(tensors) - set(own))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]} (not in this model config)")
    model.load_state_dict({k: v for k, v in tensors.items()}, strict=not tied)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """(tensors, json-able rest) of an optimizer's state, with parameters named, not numbered."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{names[idx]}::{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{names[idx]}::{key}"] = val
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    for g in groups:
        g["params"] = [names[i] for i in g["params"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict, rest: dict) -> None:
    index = {n: i for i, n in names.items()}
    state: dict = {}
    for key, val in tensors.items():
        name, _, field = key.partition("::")
        if name not in index:
            raise CheckpointError(f"optimizer.safetensors: state for unknown parameter {name}")
        state.setdefault(index[name], {})[field] = val
    for key, val in rest["scalars"].items():
        name, _, field = key.partition("::")
        state.setdefault(index[name], {})[field] = val
    groups = []
    for g in rest["param_groups"]:
        g = dict(g)
        g["params"] = [index[n] for n in g["params"]]
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    rest = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, rest


def set_rng_state(tensors: dict, rest: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    py = rest["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = rest["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not valid JSON") from None


def first_nonfinite(named_tensors) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, else None."""
    for name, t in named_tensors:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None
