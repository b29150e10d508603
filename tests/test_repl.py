"""What a client sees: the REPL, compared with code.InteractiveConsole."""
import re
import shutil
import socket
import subprocess

import pytest

from conftest import (DEMO, HOST, PS1, PS2, TIMEOUT, Client, interactive_console,
                      wait_true)


def session(proc, text):
    """Send text, half-close, return the whole transcript (minus greeting)."""
    c = proc.client()
    c.send(text)
    c.shutdown_write()
    out = c.read_all().decode("utf-8", "replace")
    c.close()
    return out


def test_quick_example_transcript(demo):
    c = demo.client()
    assert c.greeting == b"Well this is neat\n>>> "
    assert c.cmd("1 + 1") == "2\n"
    assert c.cmd("print('hello')") == "hello\n"
    assert c.cmd("x = 5") == ""
    assert c.cmd("x") == "5\n"
    assert c.cmd("None") == ""


ORACLE_CASES = {
    "expressions": "1 + 1\n'a' * 3\n[1, 2, {'k': (3,)}]\nNone\nprint('x', 2)\n_\n",
    "for": "for i in range(3):\n    print(i)\n\n",
    "while": "n = 0\nwhile n < 3:\n    n += 1\n\nn\n",
    "if_elif_else": "x = 2\nif x == 1:\n    print('one')\nelif x == 2:\n    print('two')\nelse:\n    print('many')\n\n",
    "def": "def f(a, b=2):\n    return a * b\n\nf(3)\nf\n",
    "class": "class A:\n    def __init__(self):\n        self.v = 1\n    def __repr__(self):\n        return 'A(%d)' % self.v\n\nA()\n",
    "try": "try:\n    1/0\nexcept ZeroDivisionError as e:\n    print('caught', e)\nfinally:\n    print('finally')\n\n",
    "decorators": "def deco(f):\n    def g(*a):\n        return ('wrapped', f(*a))\n    return g\n\n@deco\ndef h(x):\n    return x\n\nh(4)\n",
    "with": "import contextlib\n@contextlib.contextmanager\ndef cm():\n    print('in')\n    yield 5\n    print('out')\n\nwith cm() as v:\n    print(v)\n\n",
    "runtime_error": "1/0\n",
    "nested_traceback": "def a():\n    return b()\n\ndef b():\n    return {}['missing']\n\na()\n",
    "chained_exception": "try:\n    1/0\nexcept Exception as e:\n    raise ValueError('again') from e\n\n",
    "syntax_error": "1 +\nx = = 2\n",
    "syntax_error_in_block": "def f():\n    return (\n\n)\n\n",
    "indentation_error": "if True:\nprint(1)\n",
    "unterminated_string": "'abc\n",
    "name_error": "undefined_name\n",
    "unicode": "print('h\u00e9llo \u2603')\n'\u00e9'\n",
    "multiple_statements": "a = 1; b = 2; a + b\n",
    "blank_lines": "\n\n1\n\n",
    "lambda_and_comprehension": "sq = lambda v: v * v\n[sq(i) for i in range(4)]\n{i: i for i in 'ab'}\n",
    "raise_custom": "class E(Exception): pass\n\nraise E('boom')\n",
    "keyboard_interrupt": "raise KeyboardInterrupt\n",
    "assert": "assert 1 == 2, 'nope'\n",
    "continuation_backslash": "x = 1 + \\\n  2\nx\n",
    "open_bracket": "y = [1,\n2,\n3]\ny\n",
    "comment_only": "# nothing\n1\n",
    "generator_repr": "(i for i in [])\n",
}


@pytest.mark.parametrize("name", sorted(ORACLE_CASES))
def test_transcript_matches_interactive_console(start, name):
    text = ORACLE_CASES[name]
    p = start(DEMO, "--no-banner")
    got = session(p, text)
    want = interactive_console(text)
    # generator reprs carry addresses
    addr = re.compile(r"0x[0-9a-f]+")
    assert addr.sub("0x", ">>> " + got) == addr.sub("0x", want)


def test_multiline_prompts_use_ps2(demo):
    c = demo.client()
    c.send("for i in range(2):\n")
    assert c.read_until(PS2) == PS2
    c.send("    print(i)\n")
    assert c.read_until(PS2) == PS2
    c.send("\n")
    assert c.read_until(PS1) == b"0\n1\n>>> "


def test_syntax_error_shows_no_internal_frames(demo):
    c = demo.client()
    out = c.cmd("x = = 1")
    assert out == '  File "<stdin>", line 1\n    x = = 1\n        ^\nSyntaxError: invalid syntax\n'
    assert "codeop" not in out and "Traceback" not in out


def frames_and_error(out):
    """A traceback without the source lines and carets 3.13+ shows under
    frames from the prompt (as its python3 -i does)."""
    return [line for line in out.splitlines() if not line.startswith("    ")]


def test_traceback_shows_no_internal_frames(demo):
    c = demo.client()
    out = c.cmd("1/0")
    assert frames_and_error(out) == [
        'Traceback (most recent call last):',
        '  File "<stdin>", line 1, in <module>',
        'ZeroDivisionError: division by zero']
    c.block(["def f():", "    raise KeyError('k')"])
    out = c.cmd("f()")
    assert frames_and_error(out) == [
        "Traceback (most recent call last):",
        '  File "<stdin>", line 1, in <module>',
        '  File "<stdin>", line 2, in f',
        "KeyError: 'k'",
    ]


def test_sys_last_traceback_set_like_the_repl(demo):
    c = demo.client()
    c.cmd("1/0")
    assert c.cmd("import sys; sys.last_type.__name__") == "'ZeroDivisionError'\n"


def test_print_capture_reaches_only_that_client(demo):
    a = demo.client()
    b = demo.client()
    assert a.cmd("print('to a')") == "to a\n"
    assert b.cmd("1") == "1\n"
    assert b.buf == b""


def test_stdout_and_stderr_writes_reach_client(demo):
    c = demo.client()
    out = c.cmd("import sys; sys.stdout.write('o\\n'); sys.stderr.write('e\\n')")
    # single mode shows every expression statement, as the REPL does
    assert out == "o\n2\ne\n2\n"


def test_prompt_honours_sys_ps1_and_ps2(demo):
    c = demo.client()
    c.send("import sys; sys.ps1 = 'py> '; sys.ps2 = 'more '\n")
    c.read_until(b"py> ")
    c.send("if 1:\n")
    c.read_until(b"more ")
    c.send("  print('in')\n\n")
    assert c.read_until(b"py> ").endswith(b"in\npy> ")


def test_future_import_persists_in_session(demo):
    c = demo.client()
    c.cmd("from __future__ import barry_as_FLUFL")
    assert c.cmd("1 <> 2") == "True\n"


def test_underscore_holds_last_result(demo):
    c = demo.client()
    c.cmd("40 + 2")
    assert c.cmd("_") == "42\n"


def test_streaming_output_in_threaded_mode(demo):
    a = demo.client()
    b = demo.client()
    b.cmd("import threading; ev = threading.Event()")
    a.send("print('first', flush=True); ev.wait(30); print('second')\n")
    a.read_until(b"first\n")
    # the statement is still running: no prompt yet
    assert PS1 not in a.buf
    b.cmd("ev.set()")
    assert a.read_until(PS1) == b"True\nsecond\n>>> "


def test_half_close_with_nc_runs_everything(demo):
    nc = shutil.which("nc")
    assert nc, "netcat-openbsd must be installed"
    text = "x = 1\nfor i in range(3):\n    x += i\n\nprint('x is', x)\nimport time; time.sleep(0.3); print('late')\n"
    r = subprocess.run([nc, "-N", "-U", demo.unix_path], input=text.encode(),
                       stdout=subprocess.PIPE, timeout=TIMEOUT)
    out = r.stdout.decode()
    assert out == "Well this is neat\n>>> >>> ... ... >>> x is 4\n>>> late\n>>> "


def test_block_open_at_eof_runs(demo):
    c = demo.client()
    c.send("for i in range(2):\n    print('i', i)\n")
    c.shutdown_write()
    assert c.read_all() == b"... ... i 0\ni 1\n"


def test_socat_session(demo):
    socat = shutil.which("socat")
    assert socat, "socat must be installed"
    r = subprocess.run([socat, "-t", "5", "-", "UNIX-CONNECT:" + demo.unix_path],
                       input=b"print(6 * 7)\n", stdout=subprocess.PIPE, timeout=TIMEOUT)
    assert r.stdout == b"Well this is neat\n>>> 42\n>>> "


def test_threaded_timeout_interrupts_pure_python_loop(start):
    p = start(DEMO, "--timeout", "1")
    c = p.client()
    c.cmd("done = False")
    # (a bare `while True: pass` would not run the finally clause on
    # CPython 3.11: its async exception skips the enclosing try)
    out = c.block(["try:", "    while True:", "        n = 1", "finally:", "    done = True"])
    assert "TimeoutError" in out
    # the loop really stopped: its finally clause ran
    wait_true(lambda: c.cmd("done") == "True\n", what="loop interrupted")
    p.wait_for(r"client #1: timed-out statement ended", stream="err")


def test_blocked_sleep_lets_session_go_on(start):
    p = start(DEMO, "--timeout", "0.5")
    c = p.client()
    out = c.cmd("import time; time.sleep(600)")
    assert out.startswith("TimeoutError")
    assert c.cmd("1 + 1") == "2\n"
    assert c.cmd("'still here'") == "'still here'\n"


def test_host_loop_keeps_ticking_during_runaway_statement(start):
    p = start(DEMO, "--timeout", "10")
    a = p.client()
    b = p.client()
    a.send("while True: pass\n\n")
    a.read_until(PS2)
    out = b.cmd("import time; t0 = ticks; time.sleep(1); ticks - t0")
    assert int(out) >= 5


def test_nonthreaded_mode_runs_on_host_thread(start):
    p = start(DEMO, "--no-threaded")
    c = p.client()
    assert c.cmd("import threading; threading.current_thread() is threading.main_thread()") == "True\n"
    assert c.cmd("2 ** 10") == "1024\n"


def test_threaded_mode_runs_off_host_thread(demo):
    c = demo.client()
    assert c.cmd("import threading; threading.current_thread() is threading.main_thread()") == "False\n"


def test_nonthreaded_timeout_interrupts_loop(start):
    p = start(DEMO, "--no-threaded", "--timeout", "1")
    c = p.client()
    c.send("while True: pass\n\n")
    c.read_until(PS2)
    out = c.read_until(PS1).decode()
    assert out.startswith("TimeoutError")
    assert c.cmd("1") == "1\n"


def test_shared_namespace(start):
    p = start(DEMO, "--shared")
    a = p.client()
    b = p.client()
    a.cmd("shared_value = 123")
    assert b.cmd("shared_value") == "123\n"


def test_per_client_namespace(start):
    p = start(DEMO, "--no-shared")
    a = p.client()
    b = p.client()
    a.cmd("mine = 1")
    assert "NameError" in b.cmd("mine")
    # both start from a copy of the host's namespace
    assert a.cmd("ticks >= 0") == "True\n"
    assert b.cmd("ticks >= 0") == "True\n"


def test_fifty_concurrent_clients_each_get_own_output(start):
    p = start(DEMO, "--max-clients", "100")
    clients = [p.client() for _ in range(50)]
    for i, c in enumerate(clients):
        c.send("import time\nfor k in range(5):\n    print('c%d-%%d' %% k); time.sleep(0.01)\n\n" % i)
    for i, c in enumerate(clients):
        c.read_until(PS1)  # import
        c.read_until(PS2)
        c.read_until(PS2)
        out = c.read_until(PS1).decode()
        assert out == "".join("c%d-%d\n" % (i, k) for k in range(5)) + ">>> "
    for c in clients:
        c.close()


def test_sys_exit_status_reaches_host(start):
    p = start(DEMO)
    c = p.client()
    c.send("print('bye'); import sys; sys.exit(3)\n")
    assert c.read_all() == b"bye\n"
    assert p.wait() == 3


def test_exit_builtin_ends_only_that_session(start):
    """0.5.0 (issue 8): exit() and quit() leave, as at end of input; the
    host keeps running and hears nothing of it."""
    p = start(DEMO)
    for word in ("exit()", "quit()"):
        c = p.client()
        c.send(word + "\n")
        assert c.read_all() == b""
        assert p.client().cmd("'still here'") == "'still here'\n"
    assert p.p.poll() is None
    assert "sys.exit" not in p.err


def test_sys_exit_with_message(start):
    p = start(DEMO)
    c = p.client()
    c.send("import sys; sys.exit('goodbye')\n")
    assert c.read_all() == b"goodbye\n"
    assert p.wait() == 1


def test_tcp_with_port_zero(start, sockdir):
    p = start(DEMO, "--port", "0")
    assert p.tcp_port and p.tcp_port > 0
    assert re.search(r"listening on tcp:127\.0\.0\.1:%d\n" % p.tcp_port, p.out)
    c = Client.tcp(p.tcp_port)
    assert c.greeting == b"Well this is neat\n>>> "
    assert c.cmd("1 + 1") == "2\n"


def test_disconnect_mid_statement_interrupts_it(start):
    p = start(DEMO, "--timeout", "0")
    a = p.client()
    b = p.client()
    b.cmd("done = started = False")
    a.send("try:\n    started = True\n    while True:\n        n = 1\nfinally:\n    done = True\n\n")
    wait_true(lambda: b.cmd("started") == "True\n", what="statement started")
    a.close()
    wait_true(lambda: b.cmd("done") == "True\n", what="statement interrupted")


def test_thread_started_by_statement_writes_to_its_client(demo):
    """0.5.0: a thread a statement starts is that client's (issue 8); the
    host's stdout never sees its output."""
    c = demo.client()
    out = c.cmd("import threading; t = threading.Thread(target=print, args=('from-its-thread',)); t.start(); t.join()")
    assert out == "from-its-thread\n"
    assert "from-its-thread" not in demo.out


def test_input_builtin_reads_from_client(demo):
    c = demo.client()
    c.send("name = input('who? ')\n")
    c.read_until(b"who? ")
    c.send("Ada\n")
    c.read_until(PS1)
    assert c.cmd("name") == "'Ada'\n"


def test_stdin_of_other_threads_is_the_host_stdin(demo):
    """Only a manhole statement's thread reads the client; any other thread
    reads the host's own stdin (the demo's is /dev/null: empty)."""
    c = demo.client()
    c.cmd("import sys, threading; r = []")
    c.cmd("t = threading.Thread(target=lambda: r.extend([sys.stdin.read(), sys.stdin.readline()])); t.start(); t.join()")
    assert c.cmd("r") == "['', '']\n"
    c.send("x = sys.stdin.read()\n")
    c.send("from the client\n")
    c.read_until(PS1)
    assert c.cmd("x") == "'from the client\\n'\n"


def test_stacks_helper_lists_threads(demo):
    c = demo.client()
    out = c.cmd("stacks()")
    assert "manhole worker" in out
    assert 'File "<stdin>", line 1, in <module>' in out


def test_live_binding_reads_current_value(demo):
    c = demo.client()
    out = c.cmd("import time; a = ticks; time.sleep(0.5); b = ticks; (b > a, type(b).__name__)")
    assert out == "(True, 'int')\n"
