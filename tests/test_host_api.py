"""The C API as a host uses it: every integration style, C values and
functions in the namespace, exit status, descriptors."""
import os
import re

import pytest

from conftest import HOST, PS1, PS2, TIMEOUT, Client, needs_epoll, wait_true

LOOPS = ["poll", "select", "pollfds", pytest.param("fd", marks=needs_epoll)]


@pytest.mark.parametrize("loop", LOOPS)
def test_session_through_each_integration_style(start, loop):
    p = start(HOST, "--loop", loop, "--no-tick", "--timeout", "1")
    c = p.client()
    assert c.greeting == b">>> "
    assert c.cmd("1 + 1") == "2\n"
    assert c.cmd("print('out')") == "out\n"
    # a statement finishing on a worker wakes the host's own wait
    assert c.cmd("import time; time.sleep(0.2); 'slept'") == "'slept'\n"
    assert c.cmd("add(2, 40)") == "42\n"
    c.send("while True:\n    n = 1\n\n")
    c.read_until(PS2)
    c.read_until(PS2)
    assert c.read_until(PS1).startswith(b"TimeoutError")


@pytest.mark.parametrize("loop", ["select", pytest.param("fd", marks=needs_epoll), "poll"])
def test_idle_host_does_not_busy_poll(start, loop):
    """While a statement runs for half a second on a worker, the host's
    loop turns only for the manhole's own events, not in a busy loop."""
    p = start(HOST, "--loop", loop, "--no-tick")
    c = p.client()
    out = c.cmd("import time; t0 = turns(); time.sleep(0.5); turns() - t0")
    assert int(out) < 10


def test_fdset_loop_wakes_for_worker_output(start):
    """The host sleeps in select() with no timer; output produced later
    on a worker thread must wake it (the wake-up descriptor)."""
    p = start(HOST, "--loop", "select", "--no-tick", "--shared")
    a = p.client()
    b = p.client()
    b.cmd("import threading; ev = threading.Event()")
    a.send("ev.wait(30); print('woken')\n")
    b.cmd("ev.set()")
    assert a.read_until(PS1) == b"True\nwoken\n>>> "


def test_c_values_in_namespace(start):
    p = start(HOST, "--no-tick")
    c = p.client()
    assert c.cmd("answer, pi, greeting, blob") == "(42, 3.25, 'h\u00e9llo', b'\\x00\\x01\\xff')\n"
    assert c.cmd("label") == "'test-host'\n"


def test_live_binding_reads_and_writes_c_variable(start):
    p = start(HOST, "--shared")
    a = p.client()
    b = p.client()
    assert a.cmd("counter") == "0\n"
    a.cmd("counter = 41")
    assert b.cmd("counter + 1") == "42\n"
    assert "OverflowError" in a.cmd("counter = 2 ** 40")
    assert "TypeError" in a.cmd("counter = 'x'")
    assert "AttributeError" in a.cmd("ticks = 5")
    assert "AttributeError" in a.cmd("label = 'x'")
    # live in functions and comprehensions too
    a.block(["def get():", "    return ticks"])
    out = a.cmd("import time; x = get(); time.sleep(0.3); [get() > x, [ticks for _ in 'a'][0] > x]")
    assert out == "[True, True]\n"


def test_c_function_calls_and_errors(start):
    p = start(HOST)
    c = p.client()
    assert c.cmd("add(1, 2)") == "3\n"
    assert c.cmd("echo('s\u00e9'), echo(b'b'), echo(1.5), echo(None), echo(True)") == \
        "('s\u00e9', b'b', 1.5, None, True)\n"
    out = c.cmd("fail('nope')")
    assert out.splitlines()[-1] == "ValueError: nope"
    assert "TypeError" in c.cmd("add(1)")
    assert "TypeError" in c.cmd("echo([1])")
    assert "TypeError" in c.cmd("add(a=1)")
    assert c.cmd("add.__doc__") == "'add(a, b): a + b in C'\n"
    assert c.cmd("add") == "<C function add>\n"


def test_c_functions_run_on_host_thread_unless_any_thread(start):
    p = start(HOST)
    c = p.client()
    assert c.cmd("on_host_thread()") == "True\n"
    assert c.cmd("any_thread_echo(7)") == "7\n"


@pytest.mark.parametrize("loop", ["poll", "select"])
def test_sys_exit_status_from_c_host(start, loop):
    p = start(HOST, "--loop", loop)
    c = p.client()
    c.send("import sys; sys.exit(5)\n")
    assert c.read_all() == b""
    assert p.wait() == 5


def test_nonthreaded_host_exit_status(start):
    p = start(HOST, "--no-threaded")
    c = p.client()
    c.send("raise SystemExit(7)\n")
    c.read_all()
    assert p.wait() == 7


def test_close_leaves_socket_file(start, sockdir):
    p = start(HOST)
    c = p.client()
    c.cmd("1")
    assert p.stop() == 0
    assert os.path.exists(sockdir / "s")
    assert "closed after" in p.out


def test_close_leaves_uninterruptible_statement_behind(start):
    """manhole_close() gives a statement Python cannot interrupt one second,
    then returns and leaves its thread behind; the host goes on."""
    p = start(HOST, "--timeout", "0", "--shared")
    b = p.client()
    b.cmd("started = False")
    c = p.client()
    c.send("import time; started = True; time.sleep(600)\n")
    wait_true(lambda: b.cmd("started") == "True\n", what="statement started")
    assert p.stop() == 0
    assert "stuck in uninterruptible calls left behind" in p.err
    assert "closed after" in p.out


@pytest.mark.parametrize("prio,want", [("nice", "(0, 5)"), ("idle", "(5, 0)"), ("normal", "(0, 0)")])
def test_worker_priority(start, prio, want):
    """Statements run below the host's priority by default (nice +5);
    MANHOLE_WORKERS_IDLE makes them SCHED_IDLE (5); NORMAL leaves them as
    the host. Read on the worker thread itself."""
    if os.getpriority(os.PRIO_PROCESS, 0) != 0:
        pytest.skip("the test runs at a nice value already")
    p = start(HOST, "--worker-priority", prio)
    c = p.client()
    assert c.cmd("import os; (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))") == want + "\n"
    # the host thread itself is untouched
    assert c.cmd("on_host_thread()") == "True\n"


def test_del_of_bound_name_removes_it_from_that_session_only(start):
    """`del ticks` at the prompt really removes the name there (it used to
    say NameError and keep reading the C variable); other clients and the
    C variable keep the binding; an assignment afterwards is an ordinary
    Python name that no longer writes the C variable."""
    p = start(HOST)
    a = p.client()
    b = p.client()
    assert a.cmd("del ticks") == ""
    assert a.cmd("ticks").splitlines()[-1].startswith("NameError: name 'ticks' is not defined")
    assert a.cmd("'ticks' in globals()") == "False\n"
    assert b.cmd("isinstance(ticks, int)") == "True\n"
    assert a.cmd("del counter") == ""
    assert a.cmd("counter = 'mine'; counter") == "'mine'\n"
    assert b.cmd("counter") == "0\n"        # the C variable was not written
    b.cmd("counter = 3")
    assert a.cmd("counter") == "'mine'\n"
    assert p.client().cmd("counter") == "3\n"  # a later client has the binding


def test_del_of_bound_name_in_shared_namespace_removes_it_for_all(start):
    p = start(HOST, "--shared")
    a = p.client()
    b = p.client()
    assert a.cmd("del label") == ""
    assert b.cmd("label").splitlines()[-1].startswith("NameError: name 'label' is not defined")
    assert a.cmd("del label").splitlines()[-1].startswith("NameError")

