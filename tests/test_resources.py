"""tools/resources.py: a child's own peak RSS and exit code."""

from __future__ import annotations

import sys

from tools.resources import run_measured


def test_peak_rss_of_a_child_that_allocates_300_mb():
    small = run_measured([sys.executable, "-c", "pass"])
    big = run_measured([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert small.returncode == 0 and big.returncode == 0
    assert big.peak_rss_bytes - small.peak_rss_bytes > 280 * 2**20
    assert small.peak_rss_bytes < 60 * 2**20  # not the test runner's own memory
    assert big.seconds > 0


def test_exit_code_and_output_are_kept():
    m = run_measured([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert m.returncode == 3 and m.stdout.strip() == "out" and m.stderr.strip() == "err"


def test_a_missing_program_is_exit_127_with_a_reason():
    m = run_measured(["/nonexistent/program"])
    assert m.returncode == 127 and "cannot run" in m.stderr
