"""Run a command as a child process and measure its wall time and peak memory.

Benchmarks that compare our trainer with another tool's (for example open_clip's own
``open_clip_train``) run that tool as a subprocess, so its imports, threads and memory
are its own; this module starts it, captures its output and reads its peak resident
memory from the kernel.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REPO_ROOT", "Measured", "median_seconds", "run_measured", "thread_env", "timed_seconds"]

REPO_ROOT = Path(__file__).resolve().parents[1]

# Linux copies the peak RSS of the address space a process had before exec() into its
# ru_maxrss (exec_mmap -> setmax_mm_hiwater_rss), so a command spawned straight from a
# large parent (one that has imported torch, say) would report at least the parent's
# peak. This small interpreter spawns the command instead, reaps it with wait4 and
# writes its ru_maxrss (KiB), wall seconds and exit code to the fd in argv[1]; like
# Popen it restores the SIGPIPE and SIGXFSZ that Python ignores.
_LAUNCHER = """\
import os, signal, sys, time
fd = int(sys.argv[1])
os.set_inheritable(fd, False)
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
_, status, usage = os.wait4(pid, 0)
os.write(fd, f"{usage.ru_maxrss} {time.perf_counter() - start} {os.waitstatus_to_exitcode(status)}".encode())
"""


@dataclass(frozen=True)
class Measured:
    """What one finished child process did."""

    returncode: int  # negative: killed by that signal (as in subprocess)
    stdout: str
    stderr: str
    wall_seconds: float  # from spawning the command to reaping it
    max_rss_bytes: int  # peak resident set size of the command (see run_measured)


def thread_env(threads: int) -> dict[str, str]:
    """A copy of ``os.environ`` that pins a child to ``threads`` math threads and works offline.

    Sets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, forbids Hugging Face Hub and datasets
    downloads, unbuffers Python's output, and puts this repository first on
    ``PYTHONPATH`` so the child can import ``peftclip`` and ``benchmarks``.

    Args:
        threads: number of intra-op threads the child's math libraries may use.

    >>> thread_env(2)["OMP_NUM_THREADS"]
    '2'
    """
    if threads < 1:
        raise ValueError(f"threads={threads}: must be a positive integer")
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(paths),
    )
    return env


def run_measured(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
) -> Measured:
    """Run ``cmd`` to completion and return its exit status, output, wall time and peak RSS.

    stdout and stderr go to temporary files, so a child that writes a lot cannot block on
    a full pipe. The peak RSS is ``ru_maxrss`` from ``os.wait4`` on the command's
    process (through a ~10 MB launcher, so the caller's own memory is not counted). It is
    the largest peak of ONE process: the command's, or that of a process it started and
    reaped itself (a DataLoader worker), whichever is larger; concurrent processes are
    not summed, and processes it never reaped are not seen at all.

    Args:
        cmd: program and arguments; the program is looked up on ``PATH`` as by ``execvp``.
        env: the command's environment (default: this process's); see ``thread_env``.
        cwd: the command's working directory (default: this process's).
        timeout: seconds before the command is killed and ``subprocess.TimeoutExpired`` raised.

    >>> run_measured([sys.executable, "-c", "print('hi')"]).stdout
    'hi\\n'
    """
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, open(read_fd, "rb") as usage_pipe:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, str(write_fd), *cmd],
                stdout=out, stderr=err, env=env, cwd=cwd, pass_fds=(write_fd,),
                start_new_session=True,  # one process group, so a timeout can end both processes
            )
        finally:
            os.close(write_fd)
        _wait(proc, cmd, timeout)
        usage = usage_pipe.read().decode().split()
        out.seek(0)
        err.seek(0)
        if not usage:  # the launcher failed before the command ran, e.g. no such program
            last = (err.read().strip().splitlines() or ["no error message"])[-1]
            raise RuntimeError(f"cannot run {cmd[0]!r} (cwd={cwd}): {last}")
        return Measured(
            returncode=int(usage[2]),
            stdout=out.read(),
            stderr=err.read(),
            wall_seconds=float(usage[1]),
            max_rss_bytes=int(usage[0]) * 1024,  # Linux reports KiB
        )


def _wait(proc: subprocess.Popen, cmd: list[str], timeout: float | None) -> None:
    """Wait for the launcher ``proc`` running ``cmd``; on timeout or interrupt kill its process group."""
    try:
        proc.wait(timeout)
    except BaseException as e:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise subprocess.TimeoutExpired(cmd, timeout) from e
        raise


def timed_seconds(run: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
    """Wall seconds of each of `repeats` calls of `run`, after `warmup` untimed calls.

    >>> len(timed_seconds(lambda: None, repeats=3, warmup=1))
    3
    """
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """Median wall seconds of `repeats` calls of `run`, after `warmup` untimed calls.

    >>> median_seconds(lambda: None, repeats=3) < 1
    True
    """
    return statistics.median(timed_seconds(run, repeats, warmup))
