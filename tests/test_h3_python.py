"""Issue 15 (hardening III), the Python glue: points 3, 4, 12, 13 and 14.

Each test runs a real host (the demo or tests/hosts/test-host) and talks to
it over its real socket; each synchronises on prompts and deadlines, never
on sleeps. The test names say the behaviour; the docstrings name the point.
"""
import os
import re
import signal
import time

import pytest

from conftest import DEMO, HOST, PS1, TIMEOUT, Client, Timeout, wait_true
from hardening_util import Reaper, alive
from session_util import IAC_IP, ExtClient


def run_block(c, lines, timeout=TIMEOUT):
    """Send a compound statement and the empty line that ends it; return
    its output (str) without the continuation prompts and the next prompt."""
    c.send("\n".join(lines) + "\n\n")
    out = c.read_until(PS1, timeout)[:-len(PS1)]
    prompts = b"... " * len(lines)
    assert out.startswith(prompts), out
    return out[len(prompts):].decode("utf-8", "replace")


# =============================================================================
# 3. An interrupted statement leaves tracing working
# =============================================================================

TRACE_SETUP = [
    "import sys, pdb, cProfile, pstats",
    "def k(): return 1",
    "def tracer(frame, event, arg): events.append(('trace', event, frame.f_code.co_name))",
    "def profiler(frame, event, arg): events.append(('profile', event, frame.f_code.co_name))",
]


def interrupt_loop(c, how):
    """Run `while True: pass` and stop it: by Ctrl-C (telnet IAC IP) or by
    the statement timeout."""
    c.send("while True: pass\n\n")
    c.read_until(b"... ")
    if how == "ctrl-c":
        c.send(IAC_IP)
    out = c.read_until(PS1).decode()
    assert "KeyboardInterrupt" in out or "TimeoutError" in out, out


def setup_tracing(c):
    for line in TRACE_SETUP:
        if line.startswith("def "):
            assert run_block(c, [line]) == "", line
        else:
            assert c.cmd(line) == "", line


def assert_tracing_works(c):
    setup_tracing(c)
    # sys.settrace over a call
    assert c.cmd("events = []; sys.settrace(tracer); r = k(); sys.settrace(None)") == ""
    assert c.cmd("[e for e in events if e[2] == 'k']") == "[('trace', 'call', 'k')]\n"
    # sys.setprofile over a call
    assert c.cmd("events = []; sys.setprofile(profiler); r = k(); sys.setprofile(None)") == ""
    assert c.cmd("[e for e in events if e[2] == 'k']") == \
        "[('profile', 'call', 'k'), ('profile', 'return', 'k')]\n"
    # cProfile
    out = c.cmd("cProfile.run('k()')")
    assert "function calls in" in out and "TimeoutError" not in out, out
    # pdb: `n` over a call, then `s` into one (the commands queued at
    # once: the non-threaded host reads input only from what is queued)
    c.send("pdb.run('k()\\nk()')\nn\ns\nc\n")
    out = c.read_until(PS1)[:-len(PS1)].decode()
    assert re.search(r"<string>\(1\)<module>\(\)\n\(Pdb\) > <string>\(2\)<module>\(\)\n"
                     r"\(Pdb\) --Call--\n> \S*<stdin>\S*\(1\)k\(\)\n\(Pdb\) $", out), out


@pytest.mark.parametrize("how,mode", [("ctrl-c", "--threaded"), ("timeout", "--threaded"),
                                      ("timeout", "--no-threaded")])
def test_tracing_works_after_an_interrupted_statement(start, how, mode):
    """Point 3: after one interrupted `while True: pass` (Ctrl-C, or the
    statement timeout), sys.settrace, sys.setprofile, cProfile and pdb's
    `n`/`s` over a call work as before. On 3.11 they spun until the
    timeout: cancelling the late interrupt left the eval breaker signalled
    for the rest of the process."""
    p = start(DEMO, mode, "--timeout", "5" if how == "ctrl-c" else "3")
    c = p.client()
    # everything imported first: under a sanitizer an import is slow, and
    # the timeout variant has the short timeout for each statement
    setup_tracing(c)
    interrupt_loop(c, how)
    assert_tracing_works(c)
    # and again, on a second client (another worker, the same process)
    d = p.client()
    assert_tracing_works(d)


# =============================================================================
# 4. Only sys sees the library's module class
# =============================================================================

def transcript(proc, text):
    """Send text, half-close, return the whole transcript after the
    greeting, as the oracle (`python3 -i`) prints it."""
    c = proc.client()
    c.send(text)
    c.shutdown_write()
    out = c.read_all().decode("utf-8", "replace")
    c.close()
    return ">>> " + out


def test_modules_and_module_type_are_as_in_python_i(start, sockdir):
    """Point 4: types.ModuleType, inspect.ismodule(), help() and a module
    imported after the manhole opened, that has an attribute `stdout` of
    its own, behave as in `python3 -i` (the library's class for sys used
    to become types.ModuleType and the class of every new module)."""
    from conftest import interactive_console
    (sockdir / "ownstdout.py").write_text("stdout = 'mine'\n")
    text = "\n".join([
        "import sys, types, inspect, os, builtins",
        "sys.path.insert(0, %r)" % str(sockdir),
        "inspect.ismodule(os), inspect.ismodule(builtins), inspect.ismodule(sys)",
        "isinstance(builtins, types.ModuleType), type(os) is types.ModuleType",
        "type(types.ModuleType('x')) is types.ModuleType",
        "import ownstdout",
        "type(ownstdout) is types.ModuleType, ownstdout.stdout",
        "ownstdout.stdout = 'changed'; print('printing still works')",
        "ownstdout.stdout, vars(ownstdout)['stdout']",
        "import importlib.util; type(importlib.util.module_from_spec("
        "importlib.util.find_spec('ownstdout'))) is types.ModuleType",
        "",
    ])
    p = start(DEMO, "--no-banner")
    assert transcript(p, text) == interactive_console(text)


def test_help_describes_modules_and_builtins_in_full(start):
    """Point 4: help(os) prints the module's documentation (it printed
    one line), help(len) names a built-in function of module builtins
    (it said "method of builtins.module instance")."""
    p = start(DEMO)
    c = p.client()
    assert c.cmd("import types, os") == ""
    out = c.cmd("help(os)")
    assert out.startswith("Help on module os:\n\nNAME\n    os"), out[:300]
    assert "FUNCTIONS" in out and len(out.splitlines()) > 100
    out = c.cmd("help(len)")
    assert out.startswith("Help on built-in function len in module builtins:\n\nlen(obj, /)")
    assert "method of" not in out


def test_sys_stdout_assignment_is_still_the_sessions_own(start):
    """Point 4, what must not change: sys (only sys) keeps per-session
    streams; a subclass of type(sys) is an ordinary module class."""
    p = start(DEMO)
    a, b = p.client(), p.client()
    assert a.cmd("import sys, io, types; f = io.StringIO(); sys.stdout = f") == ""
    assert b.cmd("print('b sees its own')") == "b sees its own\n"
    assert a.cmd("print('into f')") == ""
    assert a.cmd("sys.stdout = sys.__stdout__; f.getvalue()") == "'into f\\n'\n"
    assert a.cmd("M = type('M', (type(sys),), {'__slots__': ()}); m = M('m')") == ""
    assert a.cmd("m.stdout = 1; type(m).__name__, m.stdout, isinstance(m, types.ModuleType)") \
        == "('M', 1, True)\n"
    assert a.cmd("isinstance(sys, M), isinstance(sys, types.ModuleType)") == "(False, True)\n"


# =============================================================================
# 12. Code the library runs outside a statement follows a statement's rules
# =============================================================================

@pytest.fixture
def rstart(start):
    """conftest's start(), and whatever the hosts' Python spawned is
    killed (SIGKILL, by pid) before the hosts are stopped."""
    reaper = Reaper()

    def _start(*a, **kw):
        return reaper.host(start(*a, **kw))

    yield _start
    reaper.reap()


SPAWN = ("def spawn(): pids.append(subprocess.Popen(['sleep', '120'], stdin=subprocess.DEVNULL, "
         "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")


def ext_block(c, lines):
    """ExtClient: a compound statement, line by line, and the empty line
    that ends it; returns the output."""
    for line in lines:
        out, _, prompt = c.statement(line)
        assert out == "" and prompt.payload == b"2... ", (out, prompt)
    return c.statement("")[0]


def blocked_signals(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", f.read(), re.M).group(1), 16)


def assert_terminates(pid):
    """The process has no signal blocked, and SIGTERM ends it."""
    assert blocked_signals(pid) == 0, "SigBlk %x" % blocked_signals(pid)
    os.kill(pid, signal.SIGTERM)
    wait_true(lambda: not alive(pid), what="pid %d gone after SIGTERM" % pid)


def spawned_pid(c, cmd=None):
    out = c.cmd(cmd or "pids[-1]")
    return int(out)


@pytest.mark.parametrize("where", ["completion", "excepthook", "ps1", "exit"])
def test_processes_started_outside_a_statement_get_a_normal_signal_mask(rstart, where):
    """Point 12: a process started by __dir__ during completion, by a
    sys.excepthook, by str() of sys.ps1 or of a SystemExit's argument
    inherits the host's signal mask, as one a statement starts does (it
    inherited a mask with every signal blocked, and survived SIGTERM)."""
    p = rstart(DEMO)
    c = ExtClient.unix(p.unix_path)
    for line in ["import subprocess, sys", "pids = []"]:
        assert c.statement(line)[0] == "", line
    assert ext_block(c, [SPAWN]) == ""
    if where == "completion":
        ext_block(c, ["class D:", "    def __dir__(self):", "        spawn(); return ['spawned']"])
        c.statement("d = D()")
        assert c.complete("d.sp") == (4, ["d.spawned"])
    elif where == "excepthook":
        c.statement("sys.excepthook = lambda *a: spawn()")
        assert c.statement("1/0")[1] == "1"
        c.statement("sys.excepthook = sys.__excepthook__")
    elif where == "ps1":
        ext_block(c, ["class P:", "    def __str__(self):", "        spawn(); return '>>> '"])
        c.statement("sys.ps1 = P()")
        c.statement("sys.ps1 = '>>> '")
    else:
        ext_block(c, ["class X:", "    def __str__(self):", "        spawn(); return 'bye'"])
        c.line("exit(X())")  # (sys.exit would stop the demo)
        c.read_to_eof()
        c = ExtClient.unix(p.unix_path)
    out, status, _ = c.statement("pids")
    pids = [int(x) for x in re.findall(r"\d+", out)]
    assert pids, out
    for pid in pids:
        assert_terminates(pid)


def test_process_started_by_a_finalizer_at_session_end_gets_a_normal_signal_mask(rstart):
    """Point 12 (sweep): what the session held is released when its
    client leaves, on a worker: a finalizer that starts a process there
    gives it the host's signal mask too."""
    p = rstart(DEMO)
    c = ExtClient.unix(p.unix_path)
    for line in ["import subprocess, sys", "pids = []"]:
        assert c.statement(line)[0] == "", line
    assert ext_block(c, [SPAWN]) == ""
    ext_block(c, ["class Sink:", "    def write(self, s): return len(s)",
                  "    def __del__(self): spawn()"])
    c.statement("sys.stdout = Sink(); del Sink")  # the session holds the only one
    c.close()
    d = p.client()
    wait_true(lambda: d.cmd("len(pids)") == "1\n", what="the finalizer ran")
    assert_terminates(int(d.cmd("pids[0]")))


LOOP_FOREVER = ["    def __str__(self):", "        while True: pass"]


@pytest.mark.parametrize("mode", ["--threaded", "--no-threaded"])
@pytest.mark.parametrize("where", ["excepthook", "exception-str", "ps1", "exit"])
def test_code_run_outside_a_statement_obeys_the_statement_timeout(start, mode, where):
    """Point 12 (sweep): a sys.excepthook, an exception's __str__, str()
    of sys.ps1 or of a SystemExit's argument that loops forever is
    interrupted at the statement timeout, as a statement is, and the
    session goes on (it held its worker forever)."""
    p = start(DEMO, mode, "--timeout", "2")
    c = p.client()
    assert c.cmd("import sys") == ""
    if where == "excepthook":
        assert c.cmd("sys.excepthook = lambda *a: [0 for _ in iter(int, 1)]") == ""
        out = c.cmd("1/0")
    elif where == "exception-str":
        assert run_block(c, ["class E(Exception):"] + LOOP_FOREVER) == ""
        out = c.cmd("raise E")
    elif where == "ps1":
        assert run_block(c, ["class P:"] + LOOP_FOREVER) == ""
        out = c.cmd("sys.ps1 = P()")
    else:
        assert run_block(c, ["class X:"] + LOOP_FOREVER) == ""
        out = c.cmd("sys.exit(X())")
    assert "TimeoutError: statement timed out after 2 seconds" in out, out
    # the session goes on, and so do others
    assert c.cmd("sys.excepthook = sys.__excepthook__; sys.ps1 = '>>> '") == ""
    assert c.cmd("6 * 7") == "42\n"
    assert p.client().cmd("'other'") == "'other'\n"


def test_ctrl_c_interrupts_a_looping_excepthook(start):
    """Point 12 (sweep): Ctrl-C reaches a sys.excepthook that loops, as it
    reaches a statement, even with no timeout."""
    p = start(DEMO, "--timeout", "0")
    c = ExtClient.unix(p.unix_path)
    c.statement("import sys")
    c.statement("sys.excepthook = lambda *a: (print('in the hook'), [0 for _ in iter(int, 1)])")
    c.line("1/0")
    c.until_output("in the hook")
    c.interrupt()
    out, status, prompt = c.wait_prompt()
    assert "KeyboardInterrupt" in out, out
    c.statement("sys.excepthook = sys.__excepthook__")
    assert c.statement("6 * 7")[0] == "42\n"


# =============================================================================
# 14. Exited workers leave threading's registry; names are unique
# =============================================================================

def thread_comms(pid):
    """{tid: name} of a process's live threads."""
    out = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                out[int(tid)] = f.read().strip()
        except OSError:
            pass  # it just ended
    return out


def test_exited_workers_vanish_from_threading_and_stacks(start):
    """Point 14: workers that ended (here: abandoned ones that come back
    to a full pool and leave) are not listed by threading.enumerate() or
    stacks(), and no thread's name is doubled (13 listed for 3 alive,
    'manhole worker 15, manhole worker 15')."""
    p = start(HOST, "--shared", "--max-workers", "1", "--timeout", "1")
    pid = p.p.pid
    a, b = p.client(), p.client()
    assert a.cmd("import threading, logging; ev = threading.Event()") == ""
    for i in range(1, 4):
        # a's statement outruns the timeout: its worker is abandoned, b's
        # statements get a new one; once the old one's wait ends it finds
        # the pool full, and exits
        assert "TimeoutError" in a.cmd("logging.getLogger().name; ev.wait()")
        assert b.cmd("ev.set(); ev.clear()") == ""
        wait_true(lambda: "manhole-w%d" % i not in thread_comms(pid).values(),
                  what="worker %d gone" % i)
    live = thread_comms(pid)
    out = b.cmd("[(t.name, t.native_id) for t in threading.enumerate()]")
    listed = eval(out)
    names = [n for n, _ in listed]
    assert len(set(names)) == len(names), names
    assert all(tid in live for _, tid in listed), (listed, live)
    assert not any(n in ("manhole worker 1", "manhole worker 2", "manhole worker 3")
                   for n in names), names
    out = b.cmd("stacks()")
    labels = re.findall(r"^Thread '([^']*)' \(ident \d+\)", out, re.M)
    assert not any(re.search(r"manhole worker (\d+)\b.*manhole worker \1\b", n) for n in labels), labels
    assert not any(re.search(r"manhole worker [123]\b", n) for n in labels), labels
    assert len(labels) == len(set(labels)) == len(listed), (labels, listed)


# =============================================================================
# 13. A thread pool's task writes to whoever submitted it
# =============================================================================

def test_thread_pool_task_output_goes_to_the_submitting_client(start):
    """Point 13: in a shared namespace A's ThreadPoolExecutor (its thread
    started by A's statement) runs B's task: B's print reaches B, not A,
    and still B after A has left (it went to the host's stdout)."""
    p = start(DEMO, "--shared")
    a, b = p.client(), p.client()
    assert a.cmd("import concurrent.futures as cf, threading") == ""
    assert a.cmd("ex = cf.ThreadPoolExecutor(max_workers=1)") == ""
    assert a.cmd("ex.submit(print, 'from A').result()") == "from A\n"
    assert b.cmd("ex.submit(print, 'from B').result()") == "from B\n"
    assert a.cmd("'A sees nothing of B'") == "'A sees nothing of B'\n"
    a.send("exit()\n")
    a.read_all()
    assert b.cmd("ex.submit(print, 'B again').result()") == "B again\n"
    # a task a task submits is the same client's
    assert b.cmd("ex.submit(lambda: ex.submit(print, 'nested')).result().result()") == "nested\n"
    assert b.cmd("ex.shutdown(wait=True)") == ""
    p.stop()
    assert "from B" not in p.out and "B again" not in p.out
