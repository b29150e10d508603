"""The C API's contracts, checked from C by tests/hosts/api-test.c:
defaults, errors and their texts, fd_set rules (adds, never clears, raises
maxfd), poll descriptor size queries, manhole_wakeup() from another thread,
the recursion guard, the host's SIGPIPE disposition left alone, two
manholes in one process, opening again after Python was finalized,
configuration refused with EINVAL naming the field (negative counts, NaN,
infinite, negative or absurd durations), names that are not identifiers or
are keywords refused, `del` of a binding in a namespace, and what
manhole_wakeup() returns (also in a child after fork())."""
import re
import subprocess

from conftest import BUILD, REPORT, TIMEOUT, WRAP


def test_api_contracts(sockdir):
    r = subprocess.run(WRAP + [str(BUILD / "tests" / "hosts" / "api-test"), str(sockdir)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT * 3)
    out = r.stdout.decode()
    failed = [line for line in out.splitlines() if line.startswith("not ok")]
    assert not failed, out
    assert re.search(r"^(\d+) checks, 0 failed$", out, re.M), out
    assert int(re.search(r"^(\d+) checks", out, re.M).group(1)) >= 70
    assert r.returncode == 0, out + r.stderr.decode()
    assert not REPORT.search(r.stderr.decode()), r.stderr.decode()
