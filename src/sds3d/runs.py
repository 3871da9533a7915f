"""Run folders: safe to resume, to share between processes, and to delete.

A run folder holds what one `sds3d generate` writes: `config.json`, `checkpoints/`, `validation/`,
the meshes, the turntable and `summary.json`. Three things keep a user's work safe:

- **A marker** (`.sds3d-run`), written by sds3d when a run starts. `--overwrite` removes only what
  sds3d writes (`SDS3D_OUTPUTS`), only in a folder that carries the marker, and only after every
  argument, the prompt included, has been checked. Files sds3d did not write are kept.
- **A lock** (`.sds3d-lock`, an exclusive `flock` held for the life of the command, with the
  holder's pid inside) for generate, resume, overwrite, export and render. A second process gets one
  line naming the holder's pid. The kernel drops the lock when its process dies, even by SIGKILL,
  so a crash never leaves a stale lock. The lock file itself stays (unlinking it would race).
- **Checksummed checkpoints.** `checkpoints/last.pt` is written to a temporary file, flushed to
  disk, and renamed over; the one before it is kept as `prev.pt`; each has its SHA-256 beside it
  (`last.pt.sha256`, `prev.pt.sha256`). A checkpoint is trusted when its digest equals a recorded
  digest (either sidecar: at every moment of the rotation one file and one sidecar agree). A
  corrupt `last.pt` falls back to `prev.pt` with a one-line warning; checkpoints from before
  checksums (no sidecar at all) load if their contents have the expected form.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sds3d.errors import UserError

MARKER = ".sds3d-run"
LOCK = ".sds3d-lock"
CHECKPOINT = Path("checkpoints") / "last.pt"
PREVIOUS = Path("checkpoints") / "prev.pt"
CHECKSUM_SUFFIX = ".sha256"
CHECKPOINT_KEYS = ("scene", "optimizer", "step", "rng")
# What `--overwrite` may remove from a marked run folder: everything sds3d writes there, nothing else.
SDS3D_OUTPUTS = (
    "config.json", "summary.json", "mesh.json", "mesh.glb", "mesh.ply", "mesh.obj", "mesh.mtl",
    "turntable.gif", "turntable.mp4", "checkpoints", "validation", MARKER,
)  # fmt: skip
SDS3D_OUTPUT_PREFIXES = ("render-",)  # `sds3d render`'s folders


def warn(message: str) -> None:
    """One line on stderr, as the CLI prints its errors."""
    print(f"sds3d: warning: {message}", file=sys.stderr)


# --- the lock -------------------------------------------------------------------------------------
class RunInUseError(UserError):
    """Another process holds the run folder's lock."""


_HELD: dict[str, list[int]] = {}  # resolved run folder → [fd, depth]: re-entrant within a process


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: lock the first byte; the pid is written further on
        import msvcrt

        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


_PID_OFFSET = 16  # past the byte Windows locks, so the holder's pid can be read there too


def _create_folder(run_dir: Path) -> bool:
    """mkdir -p, with one line for a path that cannot be a folder. → whether it was created."""
    if run_dir.is_dir():
        return False
    if run_dir.exists():
        raise UserError(f"{run_dir} is a file, not a run folder")
    for parent in run_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"cannot create {run_dir}: {parent} is a file, not a folder")
    try:
        run_dir.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"cannot create {run_dir}: {err.strerror or err}") from None
    return True


@contextlib.contextmanager
def locked(run_dir: Path | str, create: bool = False) -> Iterator[Path]:
    """Hold `run_dir`'s lock for the body (re-entrant in one process). Without `create` the folder
    must be a run (a config.json); with it a missing folder is made. If the body fails, a lock file
    this call made outside a run is removed again, and so is a folder it made that holds nothing else."""
    run_dir = Path(run_dir)
    created = _create_folder(run_dir) if create else False
    if not create and not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not an sds3d run folder (no config.json)")
    key = str(run_dir.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield run_dir
        finally:
            _HELD[key][1] -= 1
        return
    lock_path = run_dir / LOCK
    lock_created = not lock_path.exists()
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot lock {run_dir}: {err.strerror or err}") from None
    if not _try_lock(fd):
        os.lseek(fd, _PID_OFFSET, os.SEEK_SET)
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunInUseError(
            f"{run_dir} is in use by another sds3d process (pid {holder}); wait for it or stop it"
        )
    os.lseek(fd, _PID_OFFSET, os.SEEK_SET)
    os.write(fd, f"{os.getpid():<16d}".encode())
    _HELD[key] = [fd, 1]
    ok = False
    try:
        yield run_dir
        ok = True
    finally:
        del _HELD[key]
        if not ok and lock_created and not is_run(run_dir):  # leave no trace where no run began
            lock_path.unlink(missing_ok=True)
            if created and not any(run_dir.iterdir()):
                run_dir.rmdir()
        os.close(fd)  # releases the lock


# --- the marker and --overwrite -------------------------------------------------------------------
def is_run(run_dir: Path) -> bool:
    return (run_dir / MARKER).is_file()


def mark_run(run_dir: Path) -> None:
    import sds3d

    write_atomic(run_dir / MARKER, json.dumps({"sds3d": sds3d.__version__, "pid": os.getpid()}) + "\n")


def user_entries(run_dir: Path) -> list[Path]:
    """What is in `run_dir` besides the lock."""
    return sorted(p for p in run_dir.iterdir() if p.name != LOCK) if run_dir.is_dir() else []


def check_new_run(run_dir: Path, overwrite: bool) -> None:
    """A new run may start in a missing or empty folder, or with `overwrite` in a marked run."""
    if not user_entries(run_dir):
        return
    if not overwrite:
        raise UserError(
            f"{run_dir} already exists; pass --resume to continue it or --overwrite to replace it"
        )
    if not is_run(run_dir):
        raise UserError(
            f"{run_dir} is not an sds3d run folder (no {MARKER} marker); refusing to delete anything in it"
        )


def clear_run(run_dir: Path) -> list[Path]:
    """Remove what sds3d wrote in a marked run folder (call with its lock held). → the kept entries."""
    check_new_run(run_dir, overwrite=True)
    kept = []
    for entry in user_entries(run_dir):
        if entry.name in SDS3D_OUTPUTS or entry.name.startswith(SDS3D_OUTPUT_PREFIXES):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        else:
            kept.append(entry)
    if kept:
        warn(
            f"--overwrite kept {len(kept)} file(s) sds3d did not write in {run_dir}: {', '.join(p.name for p in kept)}"
        )
    return kept


# --- checkpoints ----------------------------------------------------------------------------------
def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: Path, data: bytes) -> Path:
    """`data` in a temporary file beside `path`, flushed to disk. → the temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_atomic(path: Path, text: str) -> None:
    """`path` with `text`, written beside and renamed over: a crash never leaves half a file."""
    os.replace(_write_synced(path, text.encode()), path)


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """`checkpoints/last.pt` (+ its SHA-256); the previous one becomes `prev.pt`. Every moment of
    the rotation leaves a file whose digest is recorded in a sidecar, so a crash anywhere in it
    (SIGKILL included) loses at most the checkpoint being written."""
    last, prev = run_dir / CHECKPOINT, run_dir / PREVIOUS
    last.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    tmp = _write_synced(last, data)
    if last.is_file():
        os.replace(last, prev)  # prev.pt = old last; last.pt.sha256 still records it
        if _sidecar(last).is_file():
            os.replace(_sidecar(last), _sidecar(prev))
    # prev.pt is recorded in prev's sidecar now, so last's may take the new digest.
    write_atomic(_sidecar(last), _digest(data) + "\n")
    os.replace(tmp, last)


@dataclass
class LoadedCheckpoint:
    state: dict[str, Any]
    path: Path


def _recorded_digests(run_dir: Path) -> set[str]:
    digests = set()
    for path in (run_dir / CHECKPOINT, run_dir / PREVIOUS):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            digests.add(_sidecar(path).read_text().strip())
    return digests


def _read_checkpoint(path: Path, digests: set[str], map_location: str) -> dict[str, Any]:
    """The state dict in `path`, or UserError saying in a few words why it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if digests and _digest(data) not in digests:
        raise UserError(
            f"{path} is corrupt (its SHA-256 does not match the one recorded when it was written)"
        )
    try:
        with warnings.catch_warnings():  # torch's note on a foreign pickle protocol: our one line says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported" in str(err) or "global" in str(err).lower():
            raise UserError(
                f"refusing {path}: it holds Python objects, not only tensors (a crafted or foreign pickle); "
                "sds3d loads checkpoints with weights_only=True and never runs their code"
            ) from None
        raise UserError(f"{path} is not a readable checkpoint ({_short(err)})") from None
    except Exception as err:  # truncated zip, garbled header, …: torch raises several types
        raise UserError(f"{path} is not a readable checkpoint ({_short(err)})") from None
    if not isinstance(state, dict) or not all(k in state for k in CHECKPOINT_KEYS):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise UserError(
            f"{path} is not an sds3d checkpoint (expected keys {list(CHECKPOINT_KEYS)}, found {keys})"
        )
    if not isinstance(state["scene"], dict) or not isinstance(state["optimizer"], dict):
        raise UserError(f"{path} is not an sds3d checkpoint (its scene or optimizer is not a state dict)")
    if not isinstance(state["rng"], torch.Tensor) or state["rng"].dtype != torch.uint8:
        raise UserError(f"{path} is not an sds3d checkpoint (its generator state is not a byte tensor)")
    try:
        int(state["step"])
    except (TypeError, ValueError):
        raise UserError(f"{path} is not an sds3d checkpoint (its step is not a number)") from None
    bad = [name for name, t in _tensors(state) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # training never saves a diverged scene, so this is damage (or a pre-checksum file's)
        raise UserError(f"{path} holds NaN/Inf values ({bad[0]})")
    return state


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}[{i}]")


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:120]}" if text else type(err).__name__


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT).is_file() or (run_dir / PREVIOUS).is_file()


def load_checkpoint(run_dir: Path, map_location: str = "cpu", quiet: bool = False) -> LoadedCheckpoint:
    """The newest usable checkpoint of a run: `last.pt`, else `prev.pt` with a one-line warning."""
    candidates = [p for p in (run_dir / CHECKPOINT, run_dir / PREVIOUS) if p.is_file()]
    if not candidates:
        raise UserError(f"{run_dir} has no checkpoint ({CHECKPOINT}); train it first")
    digests = _recorded_digests(run_dir)
    errors = []
    for path in candidates:
        try:
            state = _read_checkpoint(path, digests, map_location)
        except UserError as err:
            errors.append(str(err))
            continue
        if errors and not quiet:
            warn(f"{errors[0]}; using the previous checkpoint {path} (step {int(state['step'])})")
        elif path.name != CHECKPOINT.name and not quiet:
            warn(f"{run_dir / CHECKPOINT} is missing; using {path} (step {int(state['step'])})")
        return LoadedCheckpoint(state, path)
    if len(errors) == 1:
        raise UserError(errors[0])
    raise UserError(f"{errors[0]}; {PREVIOUS.name} is no better ({errors[1].split(': ', 1)[-1]})")


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest usable checkpoint, or None."""
    if not has_checkpoint(run_dir):
        return None
    try:
        return int(load_checkpoint(run_dir, quiet=True).state["step"])
    except UserError:
        return None


def load_state(module: torch.nn.Module | torch.optim.Optimizer, state: dict[str, Any], what: str) -> None:
    """`module.load_state_dict(state)`, strict, with one line when the run's config.json describes
    a different scene than the checkpoint holds (edited, or from another version)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        detail = " ".join(str(err).split())
        raise UserError(f"config.json does not match {what}: {detail[:200]}") from None
