"""Run a command as a child process and measure its wall time and peak resident memory (RSS).

Linux counts the memory a process had before ``exec`` in its peak (``ru_maxrss``): a command forked straight from
a large process (a test runner, a benchmark holding volumes) would report that process's size. So the command is
started by a minimal launcher (``python -S``, about 10 MB) that ``os.wait4``-s for exactly that command and writes
the command's own ``ru_maxrss`` (KiB on Linux) and wall time to a file. Used by ``tools/peak_memory.py`` and
``tools/benchmark.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# argv: result file, working folder ("" = inherit), then the command
_LAUNCHER = """
import json, os, sys, time
result, cwd, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        if cwd:
            os.chdir(cwd)
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"error: cannot run {cmd[0]}: {exc}", file=sys.stderr)
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(result, "w") as f:
    json.dump({"status": os.waitstatus_to_exitcode(status), "seconds": seconds, "maxrss_kib": usage.ru_maxrss}, f)
"""


@dataclass
class Measured:
    """One measured run: exit code, wall seconds, peak RSS in bytes, and the captured output."""

    returncode: int
    seconds: float
    peak_rss_bytes: int
    stdout: str
    stderr: str

    @property
    def peak_rss_gb(self) -> float:
        """Peak RSS in GB (10^9 bytes)."""
        return self.peak_rss_bytes / 1e9

    def tail(self, lines: int = 12) -> str:
        """The last `lines` lines of the command's stdout and stderr, for an error message."""
        return "\n".join((self.stdout + self.stderr).strip().splitlines()[-lines:])


def thread_env(threads: int) -> dict:
    """This environment with one thread count for torch, OpenMP, MKL and ITK, so measured commands compare."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads),
    }


def run_measured(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> Measured:
    """Run `cmd` to completion and return its :class:`Measured` exit code, wall time and peak RSS.

    The peak includes at most the launcher's own pages before ``exec`` (about 10 MB). Output goes to temporary
    files (not pipes), so a command that prints a lot cannot block on a full pipe. A program that cannot be started
    gives exit code 127 and the reason in ``stderr``.
    """
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.NamedTemporaryFile("r", suffix=".json") as result,
    ):
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, result.name, cwd or "", *map(str, cmd)]
        subprocess.run(launcher, env=env, stdout=out, stderr=err, check=False)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        try:
            measured = json.loads(open(result.name).read())
        except (json.JSONDecodeError, OSError):
            return Measured(127, 0.0, 0, stdout, stderr + "\nerror: the measuring launcher wrote no result")
    return Measured(measured["status"], measured["seconds"], int(measured["maxrss_kib"]) * 1024, stdout, stderr)


if __name__ == "__main__":  # python tools/resources.py CMD ...: print the command's wall time and peak RSS
    m = run_measured(sys.argv[1:])
    sys.stdout.write(m.stdout)
    sys.stderr.write(m.stderr)
    print(f"exit {m.returncode}, {m.seconds:.2f} s, peak RSS {m.peak_rss_gb:.3f} GB", file=sys.stderr)
    sys.exit(m.returncode)
