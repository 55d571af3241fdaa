"""Who may write to a run's `output_dir`: one process at a time, and a fresh run never over another's.

Two runs in one directory used to mix: a fresh run's NaN error could name the old run's checkpoint
as its own last good one, `resume=True` could continue the wrong run, and each run's pruning deleted
the other's temporary directories. So `train()` holds `output_dir/.lock` for its whole duration (an
`flock`: the kernel drops it when the process dies, so a killed run leaves no stale lock), and a fresh
run in a directory that holds another run's checkpoints or metrics.json is refused unless it resumes
that run or is told to overwrite it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..core.config import ConfigError
from .checkpoint import LAST, checkpoint_dirs

try:
    import fcntl
except ImportError:  # not on POSIX: runs are not locked
    fcntl = None

LOCK_FILE = ".lock"
RUN_FILES = (LAST, "metrics.json", "metrics.json.tmp", "loss.png", "adapter")
"""What a run writes besides its checkpoints; `overwrite` removes these and nothing else."""


class OutputDirError(ConfigError):
    """`output_dir` is in use by another process, or holds another run's files."""


@contextlib.contextmanager
def claim(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold `output_dir/.lock` for the block; OutputDirError when another live process holds it.

    The file records the holder's pid, for the message the next process gets.
    """
    path = Path(output_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise OutputDirError(f"another run is using output_dir {output_dir} (pid {holder}); wait for it "
                                     "to finish, stop it, or give this run another output_dir") from None
            except OSError as err:  # a filesystem without flock (some network mounts): train unlocked
                warnings.warn(f"cannot lock {path} ({err}); make sure no other run uses {output_dir}", stacklevel=3)
            else:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def previous_run(output_dir: str | os.PathLike) -> list[str]:
    """Names of what an earlier run left in `output_dir` (checkpoints, checkpoint-last, metrics.json)."""
    directory = Path(output_dir)
    found = [path.name for _, path in checkpoint_dirs(directory)]
    return found + [name for name in (LAST, "metrics.json") if os.path.lexists(directory / name)]


def check_fresh(output_dir: str | os.PathLike, resume, overwrite: bool) -> None:
    """Refuse a fresh run where another run left its files, unless it resumes or overwrites them."""
    found = [] if resume or overwrite else previous_run(output_dir)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise OutputDirError(
            f"output_dir {output_dir} holds another run's files ({shown}); continue that run with resume=True "
            "(`peftkit train ... --resume`), replace it with overwrite=True (`--overwrite`), or choose another "
            "output_dir")


def clear_previous_run(output_dir: str | os.PathLike) -> list[str]:
    """Delete an earlier run's checkpoints, temporary directories and outputs; returns what went.

    Only what a run writes goes: other files in the directory (a run.yaml, a user's
    `checkpoint-best`) stay.
    """
    directory = Path(output_dir)
    doomed = [path for _, path in checkpoint_dirs(directory)] + sorted(directory.glob(".tmp-checkpoint-*"))
    doomed += [directory / name for name in RUN_FILES if os.path.lexists(directory / name)]
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return [path.name for path in doomed]
