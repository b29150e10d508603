"""Regression tests for lifetime, flow-control and shutdown problems found
in review: each names the failure it guards against."""
import os
import shutil
import signal
import socket
import subprocess

import pytest

from conftest import DEMO, HOST, PS1, PS2, SANITIZER, TIMEOUT, WRAP, Client, wait_true


def rss_kib(pid):
    status = open("/proc/%d/status" % pid).read()
    return int(status.split("VmRSS:")[1].split()[0])


def test_close_interrupts_a_running_loop(start):
    """manhole_close() must interrupt a pure-Python loop, not leave its
    thread behind after the grace second. (Threaded mode: in non-threaded
    mode the host is inside the statement until it ends.)"""
    # (valgrind slows the interrupt's delivery far past the default second)
    p = start(HOST, "--timeout", "0", "--shared", "--close-timeout", "60" if WRAP else "1")
    c = p.client()
    b = p.client()
    b.cmd("started = False")
    c.send("started = True\nwhile True:\n    n = 1\n\n")
    wait_true(lambda: b.cmd("started") == "True\n", what="loop started")
    assert p.stop() == 0
    assert "stuck" not in p.err
    assert "closed after" in p.out


def test_reading_resumes_after_the_input_queue_was_full(start):
    """Past max_input the host stops reading a client; it must start again
    once the queue drains, or the client hangs."""
    p = start(HOST, "--max-line", "64", "--max-input", "256")
    c = p.client()
    n = 2000
    c.send(b"".join(b"%d\n" % i for i in range(n)))
    for i in range(n):
        assert c.read_until(PS1) == b"%d\n>>> " % i


def test_block_longer_than_max_input_discarded(start):
    p = start(HOST, "--max-line", "1024", "--max-input", "4096")
    c = p.client()
    c.send("x = [\n")
    c.read_until(PS2)
    line = "1" * 60 + ",\n"
    c.send(line * 100)  # 6 KB of block
    out = c.read_until(b"manhole: block longer than 4096 bytes discarded\n>>> ")
    assert out.count(PS2) >= 60
    assert c.cmd("1") not in ("",)  # the session goes on


def test_slow_block_compile_is_bounded_by_the_timeout(start):
    """Each line recompiles the whole block (as codeop does): a huge paste
    must not pin a worker for minutes."""
    p = start(HOST, "--timeout", "0.5")
    c = p.client()
    c.send("x = (\n" + "0,\n" * 5000)
    c.read_until(b"manhole: block discarded: compiling it took longer than the 0.5 s timeout\n")
    c.close()
    assert Client.unix(p.unix_path).cmd("'alive'") == "'alive'\n"


def test_end_of_input_after_timed_out_block_closes(start):
    """A block closed by end of input that then times out is answered, and
    the connection is closed afterwards (not left open)."""
    p = start(HOST, "--timeout", "0.5")
    nc = shutil.which("nc")
    r = subprocess.run([nc, "-N", "-U", p.unix_path], input=b"while True:\n  n = 1\n",
                       stdout=subprocess.PIPE, timeout=TIMEOUT)
    assert b"TimeoutError" in r.stdout


@pytest.mark.parametrize("threaded", [True, False])
def test_client_that_never_reads_costs_bounded_memory(start, threaded):
    """Input that only produces messages, from a client that never reads:
    the host stops taking its input instead of buffering the answers."""
    args = ["--max-output", "65536"] + ([] if threaded else ["--no-threaded"])
    p = start(HOST, *args)
    s = socket.socket(socket.AF_UNIX)
    s.connect(p.unix_path)
    s.setblocking(False)
    before = rss_kib(p.p.pid)
    sent = 0
    line = b"\xc3\x28\n"  # one error line each
    chunk = line * 10000
    try:
        for _ in range(200):  # up to 6 MB, until the socket is full
            sent += s.send(chunk)
    except BlockingIOError:
        pass
    c = Client.unix(p.unix_path)
    assert c.cmd("'others fine'") == "'others fine'\n"
    if not (SANITIZER or WRAP):
        assert rss_kib(p.p.pid) - before < 8192
    # nothing was lost: every complete line got its message
    s.setblocking(True)
    s.settimeout(TIMEOUT)
    want = sent // len(line)
    got = 0
    data = b""
    while got < want:
        chunk = s.recv(1 << 20)
        assert chunk
        data += chunk
        got = data.count(b"manhole: line discarded")
    assert got == want


@pytest.mark.parametrize("threaded", [True, False])
def test_c_function_cannot_reenter_the_library(start, threaded):
    p = start(HOST, *([] if threaded else ["--no-threaded"]))
    c = p.client()
    assert c.cmd("reenter()") == "-8\n"  # MANHOLE_ERECURSIVE
    assert c.cmd("1") == "1\n"


@pytest.mark.parametrize("threaded", [True, False])
def test_host_function_called_from_another_thread_runs_on_host(start, threaded):
    p = start(HOST, *([] if threaded else ["--no-threaded"]))
    c = p.client()
    c.cmd("import threading; r = []")
    c.cmd("t = threading.Thread(target=lambda: r.append(on_host_thread())); t.start()")
    wait_true(lambda: c.cmd("r") == "[True]\n", what="call ran on the host thread")


def test_each_exit_reported_once_with_its_status(start):
    p = start(HOST, "--close-after-exit")
    a = p.client()
    b = p.client()
    a.send("import sys; sys.exit(3)\n")
    b.send("import sys; sys.exit(4)\n")
    a.read_all()
    b.read_all()
    p.wait_for(r"exit 3\n")
    p.wait_for(r"exit 4\n")
    assert p.out.count("exit ") == 2
