"""Sessions a person can steer (issue 8): interrupt, the extended channel
(completion, prompt and status records), leaving, debugging from the
prompt, threads, and TCP that asks for a secret. Plain clients must see
exactly today's bytes.

Everything synchronises on what the server sends (prompts, records, log
lines) with deadlines. The one sleep is a client's think-time while the
REPL waits for its input, which is the behaviour under test there.
"""
import os
import re
import rlcompleter
import shutil
import socket
import stat
import subprocess
import time

import pytest

from conftest import DEMO, HOST, PS1, PS2, TIMEOUT, WRAP, Client, wait_true
from parity_util import oracle_version
from session_util import (HELLO, IAC_BRK, IAC_IP, INTERRUPT, ExtClient, Record, complete_request,
                          python_i, read_until_all, read_until_any, record, run_request, scripted)

GREETING = b"Well this is neat\n>>> "
AUTH_FAILED = b"manhole: authentication failed\n"


def ext(proc, **kw):
    return ExtClient.unix(proc.unix_path, **kw)


def rl_candidates(text, namespace=None):
    """What rlcompleter gives for text (the last word), sorted, unique."""
    ns = {"__builtins__": __builtins__} if namespace is None else namespace
    comp = rlcompleter.Completer(ns)
    got = []
    i = 0
    while True:
        m = comp.complete(text, i)
        if m is None:
            break
        got.append(m)
        i += 1
    return sorted(set(got))


def output(c):
    """conftest.Client: what came before the next ps1 prompt (str)."""
    return c.read_until(PS1)[:-len(PS1)].decode("utf-8", "replace")


def last_line(text):
    lines = text.rstrip("\n").split("\n")
    return lines[-1]


LOOP_BLOCK = "if True:\n    print('go', flush=True)\n    while True: pass\n\n"


def start_loop(c):
    """conftest.Client: start a statement that prints 'go' then spins."""
    c.send(LOOP_BLOCK)
    c.read_until(PS2)
    c.read_until(PS2)
    c.read_until(PS2)
    c.read_until(b"go\n")


def start_loop_ext(c):
    """ExtClient: the same, waiting for its output."""
    c.send(LOOP_BLOCK)
    for _ in range(3):
        out, s, p = c.wait_prompt()
        assert p.payload == b"2... "
    out, recs = c.until_output("go\n")
    assert out == b"go\n" and recs == []


# ---- Interrupting a statement without leaving ----------------------------------

@pytest.mark.parametrize("how", ["iac-ip", "iac-brk"])
def test_interrupt_while_true_keeps_namespace(start, how):
    p = start(DEMO, "--timeout", "0")
    c = p.client()
    c.cmd("x = 41")
    assert c.cmd("40 + 2") == "42\n"
    start_loop(c)
    c.send(IAC_IP if how == "iac-ip" else IAC_BRK)
    out = output(c)
    assert out.startswith("Traceback (most recent call last):\n")
    assert 'File "<stdin>", line ' in out
    assert out.endswith("\nKeyboardInterrupt\n")
    assert "TimeoutError" not in out
    # the connection, _ and the namespace are intact
    assert c.cmd("_") == "42\n"
    assert c.cmd("x") == "41\n"


def test_telnet_interrupt_with_timing_mark_gets_will_tm(start):
    """telnet sends IAC IP then IAC DO TIMING-MARK on Ctrl-C and shows
    nothing until the mark comes back (RFC 860)."""
    p = start(DEMO, "--timeout", "0")
    c = p.client()
    start_loop(c)
    c.send(IAC_IP + b"\xff\xfd\x06")
    got = c.read_until(PS1)
    assert got.count(b"\xff\xfb\x06") == 1
    out = got.replace(b"\xff\xfb\x06", b"")[:-len(PS1)].decode()
    assert out.startswith("Traceback (most recent call last):\n")
    assert last_line(out) == "KeyboardInterrupt"
    assert c.cmd("'on'") == "'on'\n"


def test_interrupt_record_and_iac_ip_in_extended_mode(start):
    p = start(DEMO, "--timeout", "0")
    c = ext(p)
    for how in (INTERRUPT, IAC_IP):
        start_loop_ext(c)
        c.send(how)
        out, s, prompt = c.wait_prompt()
        assert out.startswith("Traceback (most recent call last):\n")
        assert last_line(out) == "KeyboardInterrupt"
        assert s == "1"
        assert prompt.payload == b"1>>> "
    assert c.statement("6 * 7") == ("42\n", "0", Record("P", b"1>>> "))


def test_interrupt_blocking_sleep_abandons_it_and_session_goes_on(start):
    p = start(DEMO, "--timeout", "0")
    c = p.client()
    c.cmd("y = 'kept'")
    c.send("import time; print('sleeping', flush=True); time.sleep(600)\n")
    c.read_until(b"sleeping\n")
    c.send(IAC_IP)
    out = output(c)
    assert last_line(out) == "KeyboardInterrupt"
    assert "TimeoutError" not in out
    assert c.cmd("y") == "'kept'\n"
    assert c.cmd("1 + 1") == "2\n"


def test_interrupt_at_prompt_drops_half_entered_block(demo):
    c = demo.client()
    c.send("for i in range(3):\n")
    c.read_until(PS2)
    c.send("    print('body', i)\n")
    c.read_until(PS2)
    c.send(IAC_IP)
    assert c.read_until(PS1) == b"\nKeyboardInterrupt\n>>> "
    # the block is gone: the next lines start afresh
    assert c.cmd("print('after')") == "after\n"
    assert "body" not in c.seen.decode()


def test_interrupt_at_empty_prompt_prints_keyboardinterrupt(demo):
    c = demo.client()
    c.send(IAC_IP)
    assert c.read_until(PS1) == b"\nKeyboardInterrupt\n>>> "
    assert c.cmd("1") == "1\n"


def test_interrupt_at_prompt_mid_block_in_extended_mode(demo):
    c = ext(demo)
    assert c.statement("if True:")[2].payload == b"2... "
    c.interrupt()
    out, s, prompt = c.wait_prompt()
    assert out == "\nKeyboardInterrupt\n"
    assert prompt.payload == b"1>>> "
    assert c.statement("'fresh'") == ("'fresh'\n", "0", Record("P", b"1>>> "))


def test_interrupt_while_input_waits_raises_in_input(demo):
    c = demo.client()
    c.send("answer = input('name? ')\n")
    c.read_until(b"name? ")
    c.send(IAC_IP)
    out = output(c)
    assert last_line(out) == "KeyboardInterrupt"
    assert "NameError" in c.cmd("answer")


def test_interrupt_reaches_only_the_clients_own_statement(start):
    p = start(DEMO, "--timeout", "0")
    a = p.client()
    b = p.client()
    a.cmd("b_count = 0")
    b.send("while True:\n    b_count += 1\n\n")
    b.read_until(PS2)
    b.read_until(PS2)
    start_loop(a)
    a.send(IAC_IP)
    assert last_line(output(a)) == "KeyboardInterrupt"
    # b's loop still runs: its counter keeps moving
    first = int(a.cmd("b_count"))
    wait_true(lambda: int(a.cmd("b_count")) > first, what="b's loop running")
    assert b.buf == b""
    # an interrupt at a's prompt touches nothing of b's either
    a.send(IAC_IP)
    assert a.read_until(PS1) == b"\nKeyboardInterrupt\n>>> "
    second = int(a.cmd("b_count"))
    wait_true(lambda: int(a.cmd("b_count")) > second, what="b's loop still running")
    b.send(IAC_IP)
    assert last_line(output(b)) == "KeyboardInterrupt"
    assert b.cmd("'b alive'") == "'b alive'\n"


# ---- The extended channel -------------------------------------------------------

def test_hello_answered_then_prompt_record(demo):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(TIMEOUT)
    s.connect(demo.unix_path)
    c = Client(s)
    assert c.greeting == GREETING
    c.send(HELLO)
    want = record("H", "1") + record("P", "1>>> ")
    got = c.read_until(want)
    assert got == want


def test_hello_gives_the_banner_before_the_prompt(demo):
    c = ext(demo)
    assert c.banner == b"Well this is neat\n"
    assert c.prompt == Record("P", b"1>>> ")


def test_statements_end_with_status_and_prompt_records(demo):
    c = ext(demo)
    assert c.statement("1 + 1") == ("2\n", "0", Record("P", b"1>>> "))
    assert c.statement("x = 3") == ("", "0", Record("P", b"1>>> "))
    out, s, p = c.statement("1/0")
    assert out.endswith("ZeroDivisionError: division by zero\n") and s == "1"
    assert p == Record("P", b"1>>> ")
    out, s, p = c.statement("x = = 1")
    assert out.endswith("SyntaxError: invalid syntax\n") and s == "1"
    out, s, p = c.statement("raise KeyboardInterrupt")
    assert last_line(out) == "KeyboardInterrupt" and s == "1"


def test_continuation_lines_get_ps2_records_and_no_status(demo):
    c = ext(demo)
    assert c.statement("for i in range(2):") == ("", None, Record("P", b"2... "))
    assert c.statement("    print(i)") == ("", None, Record("P", b"2... "))
    assert c.statement("") == ("0\n1\n", "0", Record("P", b"1>>> "))


def test_raw_prompt_bytes_never_sent_in_extended_mode(demo):
    c = ext(demo)
    c.statement("print('a')")
    c.statement("if 1:")
    c.statement("  print('b')")
    c.statement("")
    # what came after the hello's P record: output and records, no raw prompt
    raw = bytes(c.raw)
    tail = raw[raw.index(record("P", "1>>> ")) + len(record("P", "1>>> ")):]
    stripped = re.sub(rb"\xff\xfaM.*?\xff\xf0", b"", tail, flags=re.S)
    assert stripped == b"a\nb\n"


def test_prompt_records_follow_sys_ps1_and_ps2(demo):
    c = ext(demo)
    assert c.statement("import sys; sys.ps1 = 'py> '; sys.ps2 = 'more '")[2] == Record("P", b"1py> ")
    assert c.statement("if 1:")[2] == Record("P", b"2more ")
    assert c.statement("  pass")[2] == Record("P", b"2more ")
    assert c.statement("")[2] == Record("P", b"1py> ")


@pytest.mark.parametrize("line", ["x = input('name? ')", "import sys; x = sys.stdin.readline()"])
def test_waiting_for_input_sends_w_record(demo, line):
    c = ext(demo)
    c.line(line)
    out, recs, w = c.until("W")
    assert recs == []
    assert out == (b"name? " if "input" in line else b"")
    assert c.statement("Ada") == ("", "0", Record("P", b"1>>> "))
    assert c.statement("x.strip()") == ("'Ada'\n", "0", Record("P", b"1>>> "))


# ---- Completion --------------------------------------------------------------------

@pytest.mark.parametrize("text, n, want", [
    ("whi", 3, ["while "]),
    ("pri", 3, ["print("]),
    ("x = pri", 3, ["print("]),
    ("tic", 3, ["ticks"]),
    ("demo_a", 6, ["demo_add("]),
    ("Tru", 3, ["True"]),
    ("brea", 4, ["break", "breakpoint("]),
])
def test_completion_of_keywords_builtins_and_host_bindings(demo, text, n, want):
    c = ext(demo)
    if not text.startswith(("tic", "demo")):
        # what rlcompleter itself says on this Python
        assert rl_candidates(text.split()[-1]) == want
    assert c.complete(text) == (n, want)
    assert c.parser.events == []  # nothing else was sent


def test_completion_of_names_in_the_clients_namespace(demo):
    c = ext(demo)
    c.statement("my_variable = 1")
    c.statement("def my_function(): pass")
    c.statement("")
    # rlcompleter adds "()" for a callable that takes no arguments (3.10+;
    # "(" before, on the embedded Python as in its python3 -i)
    paren = "()" if oracle_version() >= (3, 10) else "("
    assert c.complete("my_") == (3, ["my_function" + paren, "my_variable"])
    assert rl_candidates("my_", {"my_variable": 1, "my_function": lambda: None}) == \
        ["my_function()", "my_variable"]
    c.statement("def my_other(a): pass")
    c.statement("")
    assert c.complete("my_o") == (4, ["my_other("])
    assert c.complete("print(my_v") == (4, ["my_variable"])
    assert c.complete("no_such_prefix_") == (15, [])


def test_completion_of_attributes_after_a_dot(demo):
    c = ext(demo)
    c.statement("import os")
    n, cands = c.complete("os.pa")
    assert n == 5
    assert "os.path" in cands and "os.pardir" in cands and "os.pathconf(" in cands
    assert cands == rl_candidates("os.pa", {"os": os})
    assert cands == sorted(set(cands))
    c.send("class K:\n    attr_one = 1\n    def attr_two(self, v): pass\n\n")
    for _ in range(3):
        assert c.wait_prompt() == ("", None, Record("P", b"2... "))
    assert c.wait_prompt() == ("", "0", Record("P", b"1>>> "))
    c.statement("k = K()")
    assert c.complete("k.attr_") == (7, ["k.attr_one", "k.attr_two("])


def test_completion_output_never_enters_the_repl_stream(demo):
    c = ext(demo)
    c.statement("import os")
    for i in range(5):
        c.complete("os.", rid=i)
        c.complete("pri", rid=100 + i)
    assert c.statement("'next'") == ("'next'\n", "0", Record("P", b"1>>> "))


def test_completion_answered_while_own_statement_runs(start):
    p = start(DEMO, "--timeout", "0")
    c = ext(p)
    c.statement("spin_name = 1")
    start_loop_ext(c)
    assert c.complete("spin_n", rid=7) == (6, ["spin_name"])
    # the statement is still running: no status, no prompt yet
    assert all(not isinstance(e, Record) for e in c.parser.events)
    c.interrupt()
    out, s, prompt = c.wait_prompt()
    assert last_line(out) == "KeyboardInterrupt" and s == "1"


def test_completion_from_two_clients_at_once(start):
    p = start(DEMO, "--no-shared")
    a = ext(p)
    b = ext(p)
    a.statement("alpha_only = 1")
    b.statement("beta_only = 2")
    a.send(complete_request(1, "alpha_"))
    b.send(complete_request(1, "beta_"))
    a.send(complete_request(2, "beta_"))
    b.send(complete_request(2, "alpha_"))
    assert a.completion_reply(1) == (6, ["alpha_only"])
    assert b.completion_reply(1) == (5, ["beta_only"])
    assert a.completion_reply(2) == (5, [])
    assert b.completion_reply(2) == (6, [])


def test_hanging_completion_bounded_by_timeout(start):
    p = start(DEMO, "--timeout", "1")
    c = ext(p)
    c.statement("import threading; release = threading.Event()")
    c.send("class Stuck:\n"
           "    def __dir__(self):\n"
           "        return ['hang']\n"
           "    def __getattr__(self, name):\n"
           "        release.wait()\n"
           "        return 0\n"
           "\n")
    for _ in range(6):
        assert c.wait_prompt() == ("", None, Record("P", b"2... "))
    assert c.wait_prompt() == ("", "0", Record("P", b"1>>> "))
    assert c.statement("stuck = Stuck()") == ("", "0", Record("P", b"1>>> "))
    assert c.complete("stuck.h", rid=5)[1] == []
    # the session goes on, completion too
    assert c.statement("1 + 1") == ("2\n", "0", Record("P", b"1>>> "))
    assert c.complete("pri", rid=6) == (3, ["print("])
    c.statement("release.set()")


# ---- Exit, run-a-script, 0xFF -----------------------------------------------------

def test_sys_exit_sends_x_record_then_closes(start):
    p = start(DEMO)
    c = ext(p)
    c.line("print('bye'); import sys; sys.exit(3)")
    out, recs = c.read_to_eof()
    assert out == b"bye\n"
    assert recs == [Record("X", b"3")]
    assert p.wait() == 3


def test_sys_exit_with_message_sends_x1(start):
    p = start(DEMO)
    c = ext(p)
    c.line("import sys; sys.exit('goodbye')")
    out, recs = c.read_to_eof()
    assert out == b"goodbye\n"
    assert recs == [Record("X", b"1")]
    assert p.wait() == 1


def test_run_record_executes_source_like_python_c(demo):
    c = ext(demo)
    c.send(run_request("/nonexistent/mh-script.py", "v = 20\nv\nprint(v + 1)\n"))
    assert c.wait_prompt() == ("21\n", "0", Record("P", b"1>>> "))
    assert c.statement("v") == ("20\n", "0", Record("P", b"1>>> "))


def test_run_record_traceback_names_the_file(demo):
    c = ext(demo)
    c.send(run_request("/nonexistent/mh-script.py", "def f():\n    return 1/0\n\nf()\n"))
    out, s, p = c.wait_prompt()
    assert out == ('Traceback (most recent call last):\n'
                   '  File "/nonexistent/mh-script.py", line 4, in <module>\n'
                   '  File "/nonexistent/mh-script.py", line 2, in f\n'
                   'ZeroDivisionError: division by zero\n')
    assert s == "1" and p == Record("P", b"1>>> ")


def test_run_record_syntax_error_reports_status_1(demo):
    c = ext(demo)
    c.send(run_request("/nonexistent/bad.py", "x = (\n"))
    out, s, p = c.wait_prompt()
    assert "SyntaxError" in out and '"/nonexistent/bad.py"' in out
    assert s == "1" and p == Record("P", b"1>>> ")


def test_ff_bytes_doubled_in_extended_mode_only(demo):
    line = "import sys; n = sys.stdout.buffer.write(b'a\\xffb\\n'); sys.stdout.flush()"
    plain = demo.client()
    plain.send(line + "\n")
    assert plain.read_until(PS1) == b"a\xffb\n>>> "
    c = ext(demo)
    mark = len(c.raw)
    c.line(line)
    assert c.until("P") == (b"a\xffb\n", [Record("S", b"0")], Record("P", b"1>>> "))
    assert bytes(c.raw[mark:]).startswith(b"a\xff\xffb\n")


# ---- Plain clients see nothing of it -----------------------------------------------

def test_plain_session_byte_exact_beside_extended_client(start):
    p = start(DEMO, "--timeout", "0")
    plain = p.client()
    e = ext(p)
    got = bytearray(plain.greeting)

    def step(line, until=PS1):
        plain.send(line + "\n")
        got.extend(plain.read_until(until))

    step("x = 6")
    e.complete("pri", rid=1)
    step("x * 7")
    start_loop_ext(e)
    e.complete("x", rid=2)
    step("for i in range(2):", PS2)
    e.interrupt()
    e.wait_prompt()
    step("    print(i)", PS2)
    e.statement("1/0")
    step("")
    e.statement("if 1:")
    e.interrupt()
    e.wait_prompt()
    step("1/0")
    e.line("answer = input('q? ')")
    e.until("W")
    step("y = input('name? ')", b"name? ")
    e.statement("42")
    step("Ada")
    step("print('\u00e9', y)")
    e.send(run_request("f.py", "print('ran')\n"))
    e.wait_prompt()
    step("x = = 1")
    want = ("Well this is neat\n>>> "
            ">>> "
            "42\n>>> "
            "... "
            "... "
            "0\n1\n>>> "
            "Traceback (most recent call last):\n"
            '  File "<stdin>", line 1, in <module>\n'
            + ("    1/0\n    ~^~\n" if oracle_version() >= (3, 13) else "") +  # as its python3 -i
            "ZeroDivisionError: division by zero\n>>> "
            "name? "
            ">>> "
            "\u00e9 Ada\n>>> "
            '  File "<stdin>", line 1\n'
            "    x = = 1\n"
            "        ^\n"
            "SyntaxError: invalid syntax\n>>> ").encode()
    assert bytes(got) == want


def test_nc_session_byte_exact_while_extended_client_works(start):
    nc = shutil.which("nc")
    assert nc, "netcat-openbsd must be installed"
    p = start(DEMO, "--timeout", "0")
    e = ext(p)
    start_loop_ext(e)
    text = "x = 1\nfor i in range(3):\n    x += i\n\nprint('x is', x)\n"
    r = subprocess.run([nc, "-N", "-U", p.unix_path], input=text.encode(),
                       stdout=subprocess.PIPE, timeout=TIMEOUT)
    assert r.stdout == b"Well this is neat\n>>> >>> ... ... >>> x is 4\n>>> "
    assert e.complete("pri") == (3, ["print("])
    e.interrupt()
    assert e.wait_prompt()[1] == "1"


# ---- Leaving, and exiting ------------------------------------------------------------

@pytest.mark.parametrize("how", ["exit()", "quit()"])
def test_exit_and_quit_end_only_that_session(start, how):
    p = start(DEMO)
    c = p.client()
    c.cmd("kept = 'yes'")
    c.send("print('bye'); %s\n" % how)
    assert c.read_all() == b"bye\n"
    # the host keeps running and was told nothing
    other = p.client()
    assert other.greeting == GREETING
    assert other.cmd("kept") == "'yes'\n"
    assert p.p.poll() is None
    assert "sys.exit" not in p.err


def test_exit_in_extended_mode_closes_that_connection_only(start):
    p = start(DEMO)
    c = ext(p)
    c.line("exit()")
    out, recs = c.read_to_eof()
    assert out == b""
    # the client learns the session ended (status 0); the host hears nothing
    assert [r.payload for r in recs if r.kind == "X"] == [b"0"]
    assert p.client().cmd("1") == "1\n"
    assert p.p.poll() is None
    assert "sys.exit" not in p.err
    c2 = ext(p)
    c2.line("quit(5)")
    out, recs = c2.read_to_eof()
    assert [r.payload for r in recs if r.kind == "X"] == [b"5"]
    assert p.p.poll() is None


def test_end_of_input_ends_only_that_session(start):
    p = start(DEMO)
    c = p.client()
    c.send("eof_value = 5\n")
    c.shutdown_write()
    assert c.read_all() == b">>> "
    other = p.client()
    assert other.cmd("eof_value") == "5\n"
    assert p.p.poll() is None
    assert "sys.exit" not in p.err


def test_nc_half_close_leaves_host_running(start):
    nc = shutil.which("nc")
    assert nc, "netcat-openbsd must be installed"
    p = start(DEMO)
    r = subprocess.run([nc, "-N", "-U", p.unix_path], input=b"print(6 * 7)\n",
                       stdout=subprocess.PIPE, timeout=TIMEOUT)
    assert r.stdout == b"Well this is neat\n>>> 42\n>>> "
    assert p.client().cmd("'still'") == "'still'\n"
    assert p.p.poll() is None


def test_sys_exit_3_still_exits_the_demo_with_3(start):
    p = start(DEMO)
    other = p.client()
    c = p.client()
    c.send("import sys; sys.exit(3)\n")
    assert c.read_all() == b""
    assert p.wait() == 3
    other.read_all()  # closed by the host's exit


# ---- Debugging from the prompt -----------------------------------------------------

def test_input_answered_after_twice_the_timeout_returns_the_answer(start):
    p = start(DEMO, "--timeout", "1")
    c = p.client()
    c.send('x = input("name? ")\n')
    c.read_until(b"name? ")
    time.sleep(2.5)  # the person thinks: longer than twice the statement timeout
    c.send("Ada\n")
    assert c.read_until(PS1) == b">>> "
    assert c.cmd("x") == "'Ada'\n"


def test_readline_wait_does_not_count_against_the_timeout(start):
    p = start(DEMO, "--timeout", "1")
    c = ext(p)
    c.line("import sys; line = sys.stdin.readline()")
    c.until("W")
    time.sleep(2.5)  # the person thinks: longer than twice the statement timeout
    assert c.statement("typed late") == ("", "0", Record("P", b"1>>> "))
    assert c.statement("line") == ("'typed late\\n'\n", "0", Record("P", b"1>>> "))


def test_code_between_inputs_still_times_out(start):
    p = start(DEMO, "--timeout", "1")
    c = p.client()
    c.send("if True:\n    input('first? ')\n    while True: pass\n\n")
    c.read_until(b"first? ")
    c.send("go\n")
    out = output(c)
    assert "TimeoutError" in out
    assert c.cmd("1") == "1\n"


PDB_FUNCTION_SESSION = [
    ("def f(a):", PS2),
    ("    b = a + 1", PS2),
    ("    return b * 2", PS2),
    ("", PS1),
    ("def g():", PS2),
    ("    import pdb; pdb.set_trace()", PS2),
    ("    a = 1", PS2),
    ("    b = f(a)", PS2),
    ("    return b", PS2),
    ("", b"(Pdb) "),          # g() is not called yet: the empty line ends the def
]


def pdb_transcript_matches(proc, steps):
    c = proc.client()
    got = scripted(c, steps)
    want = python_i("".join(line + "\n" for line, _ in steps))
    assert ">>> " + got == want
    return c


def test_pdb_set_trace_session_with_p_n_s_c(demo):
    steps = PDB_FUNCTION_SESSION[:-1] + [
        ("", PS1),
        ("g()", b"(Pdb) "),
        ("p 1+1", b"(Pdb) "),
        ("n", b"(Pdb) "),
        ("s", b"(Pdb) "),
        ("c", PS1),
        ("_", PS1),
    ]
    c = pdb_transcript_matches(demo, steps)
    assert c.cmd("'after pdb'") == "'after pdb'\n"


def test_pdb_quit_returns_to_the_prompt(demo):
    steps = [
        ("x = 5", PS1),
        ("import pdb; pdb.set_trace()", b"(Pdb) "),
        ("p 1+1", b"(Pdb) "),
        ("q", PS1),
        ("x", PS1),
    ]
    pdb_transcript_matches(demo, steps)


def test_breakpoint_builtin_works_like_set_trace(demo):
    steps = [
        ("def h():", PS2),
        ("    breakpoint()", PS2),
        ("    z = 3", PS2),
        ("    return z", PS2),
        ("", PS1),
        ("h()", b"(Pdb) "),
        ("n", b"(Pdb) "),
        ("p z", b"(Pdb) "),
        ("c", PS1),
    ]
    pdb_transcript_matches(demo, steps)


def test_pdb_pm_after_exception_gives_post_mortem_prompt(demo):
    steps = [
        ("1/0", PS1),
        ("import pdb; pdb.pm()", b"(Pdb) "),
        ("p 2+3", b"(Pdb) "),
        ("q", PS1),
        ("40+2", PS1),
    ]
    pdb_transcript_matches(demo, steps)


def test_interrupt_stops_code_running_under_pdb(start):
    p = start(DEMO, "--timeout", "0")
    c = p.client()
    scripted(c, [
        ("def k():", PS2),
        ("    breakpoint()", PS2),
        ("    print('looping', flush=True)", PS2),
        ("    while True: pass", PS2),
        ("", PS1),
        ("k()", b"(Pdb) "),
    ])
    c.send("c\n")
    c.read_until(b"looping\n")
    c.send(IAC_IP)
    out, token = read_until_any(c, [PS1, b"(Pdb) "])
    if token == b"(Pdb) ":
        # stopped inside the debugger, as python3 -i's pdb does on Ctrl-C
        c.send("q\n")
        out += c.read_until(PS1)
    else:
        assert last_line(out.decode()[:-len(PS1)]) == "KeyboardInterrupt"
    assert c.cmd("'stopped'") == "'stopped'\n"


def test_pdb_output_reaches_only_that_client(demo):
    other = demo.client()
    c = demo.client()
    scripted(c, [("import pdb; pdb.set_trace()", b"(Pdb) "), ("p 'dbg'", b"(Pdb) "), ("c", PS1)])
    assert other.cmd("'other'") == "'other'\n"
    assert b"Pdb" not in other.seen and b"dbg" not in other.seen
    assert "Pdb" not in demo.out and "dbg" not in demo.out


# ---- Threads ----------------------------------------------------------------------

def test_thread_started_by_statement_writes_to_its_client(demo):
    c = demo.client()
    c.cmd("import threading, time")
    c.send("threading.Thread(target=lambda: [print('tick', i) or time.sleep(0.05) "
           "for i in range(3)]).start()\n")
    got = read_until_all(c, [b"tick 0\n", b"tick 1\n", b"tick 2\n", PS1])
    assert got.replace(PS1, b"", 1) == b"tick 0\ntick 1\ntick 2\n"
    assert c.cmd("'next'") == "'next'\n"
    assert "tick" not in demo.out


def test_thread_of_a_gone_client_writes_to_the_host_not_to_others(demo):
    a = demo.client()
    b = demo.client()
    a.cmd("import threading; go_on = threading.Event()")
    a.cmd("threading.Thread(target=lambda: (go_on.wait(), print('orphan output', flush=True))).start()")
    a.close()
    demo.wait_for(r"client #1 closed", stream="err")
    assert b.cmd("go_on.set()") == ""
    demo.wait_for(r"orphan output")
    assert b.cmd("'b'") == "'b'\n"
    assert b"orphan" not in b.seen


def test_host_thread_started_before_stays_uncaptured(start):
    p = start(HOST, "--python")
    c = p.client()
    c.cmd("import __main__, time as real_time")
    c.block(["class NoisyTime:",
             "    def sleep(self, s):",
             "        __main__.time = real_time",
             "        print('host-thread-print', flush=True)",
             "        real_time.sleep(s)"])
    c.cmd("__main__.time = NoisyTime()")
    p.wait_for(r"host-thread-print")
    assert c.cmd("'client'") == "'client'\n"
    assert b"host-thread-print" not in c.seen


def test_worker_threads_are_named_manhole(demo):
    if WRAP:
        pytest.skip("the host runs under a wrapper")
    a = demo.client()
    b = demo.client()
    b.cmd("import threading; hold = threading.Event()")
    a.send("print('held', flush=True); hold.wait(60)\n")
    a.read_until(b"held\n")
    names = []
    for t in os.listdir("/proc/%d/task" % demo.p.pid):
        try:
            with open("/proc/%d/task/%s/comm" % (demo.p.pid, t)) as f:
                names.append(f.read().strip())
        except FileNotFoundError:
            pass
    assert any(n.startswith("manhole") for n in names), names
    b.cmd("hold.set()")
    a.read_until(PS1)
    assert "manhole" in a.cmd("threading.current_thread().name")


# ---- TCP asks who you are --------------------------------------------------------

def tcp_demo(start, sockdir, *args):
    secret_file = sockdir / "tcp.secret"
    p = start(DEMO, "--port", "0", "--secret-file", str(secret_file), *args, path=False)
    return p, secret_file


def read_secret(path):
    text = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", text), text
    return text[:-1]


def test_tcp_secret_file_is_0600_and_64_hex(start, sockdir):
    p, f = tcp_demo(start, sockdir)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert os.stat(f).st_uid == os.geteuid()
    read_secret(f)


def test_tcp_right_secret_gets_banner_and_prompt(start, sockdir):
    p, f = tcp_demo(start, sockdir)
    s = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=TIMEOUT)
    s.sendall(read_secret(f).encode() + b"\n")
    c = Client(s)
    assert c.greeting == GREETING
    assert c.cmd("1 + 1") == "2\n"


def test_tcp_extended_client_sends_hello_after_the_secret(start, sockdir):
    p, f = tcp_demo(start, sockdir)
    c = ExtClient.tcp(p.tcp_port, secret=read_secret(f))
    assert c.banner == b"Well this is neat\n"
    assert c.statement("2 + 2") == ("4\n", "0", Record("P", b"1>>> "))


def test_tcp_wrong_secret_refused_and_logged(start, sockdir):
    p, f = tcp_demo(start, sockdir)
    wrong = "0" * 64 if read_secret(f) != "0" * 64 else "1" * 64
    c = Client.tcp(p.tcp_port, greet=False)
    c.send(wrong + "\n")
    assert c.read_all() == AUTH_FAILED
    p.wait_for(r"127\.0\.0\.1.*(secret|authenticat)|(secret|authenticat).*127\.0\.0\.1", stream="err")


def test_tcp_without_secret_gets_no_prompt(start, sockdir):
    p, f = tcp_demo(start, sockdir)
    silent = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=TIMEOUT)
    # a client that sends nothing at all gets nothing, not even the banner
    s = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=TIMEOUT)
    s.sendall(read_secret(f).encode() + b"\n")
    assert Client(s).cmd("'someone else'") == "'someone else'\n"
    silent.setblocking(False)
    with pytest.raises(BlockingIOError):
        silent.recv(100)
    silent.setblocking(True)
    # a client that ends its input without a line is refused, never prompted
    c = Client.tcp(p.tcp_port, greet=False)
    c.send(read_secret(f)[:10])
    c.shutdown_write()
    got = c.read_all()
    assert PS1 not in got and b"Well this is neat" not in got
    silent.close()


def test_tcp_statement_as_first_line_is_not_run(start, sockdir):
    p, f = tcp_demo(start, sockdir)
    marker = sockdir / "marker"
    c = Client.tcp(p.tcp_port, greet=False)
    c.send("import pathlib; pathlib.Path(%r).write_text('ran')\n" % str(marker))
    c.send("import pathlib; pathlib.Path(%r).write_text('ran')\n" % str(marker))
    assert c.read_all() == AUTH_FAILED
    s = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=TIMEOUT)
    s.sendall(read_secret(f).encode() + b"\n")
    assert Client(s).cmd("'in'") == "'in'\n"
    assert not marker.exists()


def test_tcp_insecure_needs_no_secret_and_logs_a_warning(start):
    p = start(DEMO, "--port", "0", "--tcp-insecure", path=False)
    p.wait_for(r"warning: .*(secret|insecure)", stream="err")
    c = Client.tcp(p.tcp_port)
    assert c.greeting == GREETING
    assert c.cmd("1") == "1\n"


def test_unix_socket_needs_no_secret_beside_tcp(start, sockdir):
    p, f = tcp_demo(start, sockdir, "--path", str(sockdir / "s"))
    c = p.client()
    assert c.greeting == GREETING
    assert c.cmd("'unix'") == "'unix'\n"


def test_default_secret_file_under_xdg_runtime_dir(start, sockdir):
    run = sockdir / "run"
    run.mkdir(mode=0o700)
    p = start(DEMO, "--port", "0", path=False, env={"XDG_RUNTIME_DIR": str(run)})
    f = run / "manhole" / ("tcp-127.0.0.1:%d.secret" % p.tcp_port)
    assert stat.S_IMODE(os.stat(f.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    s = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=TIMEOUT)
    s.sendall(read_secret(f).encode() + b"\n")
    assert Client(s).cmd("3") == "3\n"
    p.stop()
    assert not f.exists()  # manhole_close() removed it


def test_default_secret_file_without_xdg_runtime_dir(start, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    p = start(DEMO, "--port", "0", path=False)
    d = "/tmp/manhole-%d" % os.geteuid()
    f = os.path.join(d, "tcp-127.0.0.1:%d.secret" % p.tcp_port)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    from pathlib import Path
    s = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=TIMEOUT)
    s.sendall(read_secret(Path(f)).encode() + b"\n")
    assert Client(s).cmd("4") == "4\n"


# ---- Regressions: what plain clients had, they keep ---------------------------------

def test_nc_session_behaves_as_before(demo):
    nc = shutil.which("nc")
    assert nc, "netcat-openbsd must be installed"
    text = "x = 1\nfor i in range(3):\n    x += i\n\nprint('x is', x)\nimport time; time.sleep(0.3); print('late')\n"
    r = subprocess.run([nc, "-N", "-U", demo.unix_path], input=text.encode(),
                       stdout=subprocess.PIPE, timeout=TIMEOUT)
    assert r.stdout == b"Well this is neat\n>>> >>> ... ... >>> x is 4\n>>> late\n>>> "


def test_bad_bytes_session_behaves_as_before(demo):
    c = demo.client()
    c.send(b"print(1)\x00\n")
    assert c.read_until(PS1) == b"manhole: line with a NUL byte discarded\n>>> "
    c.send(b"x = '\xc3\x28'\n")
    assert c.read_until(PS1) == b"manhole: line discarded: not valid UTF-8 (byte 6 is 0xc3)\n>>> "
    c.send(b"x = '\xffA'\n")  # 0xFF that is no telnet command
    assert c.read_until(PS1) == b"manhole: line discarded: not valid UTF-8 (byte 6 is 0xff)\n>>> "
    # telnet negotiation (not option 77) is still dropped silently
    c.send(b"\xff\xfb\x1f\xff\xfd\x01\xff\xfa\x18\x00xterm\xff\xf0" + b"7 * 6\r\n")
    assert c.read_until(PS1) == b"42\n>>> "
    assert c.cmd("'\u00e9'") == "'\u00e9'\n"


def test_stderr_comes_in_e_records_apart_from_stdout(start):
    """In extended mode what a session writes to sys.stderr (and the
    traceback) comes in E records, in order with stdout; a plain client gets
    the same bytes in its one stream."""
    p = start(DEMO)
    e = ext(p)
    out, status, _ = e.statement("print('to-out'); import sys; _w = sys.stderr.write('to-err\\n'); 1/0")
    assert status == "1"
    assert out.startswith("to-out\nto-err\nTraceback (most recent call last):\n")
    err = bytes(e.parser.err).decode()
    assert err.startswith("to-err\nTraceback (most recent call last):\n")
    assert err.endswith("ZeroDivisionError: division by zero\n")
    assert "to-out\n" not in err  # (3.13+ quotes the statement's source in the traceback)
    plain = p.client()
    assert plain.cmd("print('to-out'); import sys; _w = sys.stderr.write('to-err\\n'); 1/0") == out
