"""manhole-cli, the client (issue 9): end to end against the real demo.

Interactive sessions run through a real pseudo-terminal (pexpect) and are
checked on the screen a person would see; script mode and -c are checked
byte for byte; every error has its line and its exit status."""
import io
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pexpect
import pytest

from cli_util import CLI, Term, fake_server_argv, run_cli
from conftest import DEMO, TIMEOUT, WRAP, default_secret_path

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man" / "manhole-cli.1"
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs the client as another user")
UP, LEFT, RIGHT = Term.UP, Term.LEFT, Term.RIGHT

# As copied from an editor: blank lines inside the class, one before an
# else, and no blank line before the next top-level statement.
PASTED = """class A:
    def f(self):
        return 1

    def g(self):
        if self.f():
            r = 'yes'

        else:
            r = 'no'

        return r
print(A().g())
"""
# What python3 -i would show had it been typed as meant.
PASTED_SCREEN = """>>> class A:
...     def f(self):
...         return 1
...     def g(self):
...         if self.f():
...             r = 'yes'
...         else:
...             r = 'no'
...         return r
...
>>> print(A().g())
yes
>>>"""


@pytest.fixture
def state(tmp_path):
    """XDG_STATE_HOME for the client: its history lives there."""
    return tmp_path / "state"


@pytest.fixture
def term(state):
    terms = []

    def make(*args, **kw):
        t = Term(*args, state=state, **kw)
        terms.append(t)
        return t

    yield make
    for t in terms:
        t.close()


def err_line(r):
    return r.stderr.decode()


# ---- The command line ------------------------------------------------------

def test_help_matches_the_man_page():
    r = run_cli("--help")
    assert r.returncode == 0
    help_text = r.stdout.decode()
    man = MAN.read_text()
    help_opts = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", help_text))
    man_opts = {o.replace("\\-", "-") for o in re.findall(r"\\-\\-[a-z](?:[a-z]|\\-)*[a-z]", man)}
    assert help_opts == man_opts
    for short in ["-c", "-h", "-V"]:
        assert short in help_text and short.replace("-", "\\-") in man
    # the same exit statuses, each described in both
    help_status = help_text[help_text.index("Exit status:"):]
    man_status = man[man.index(".SH EXIT STATUS"):man.index(".SH", man.index(".SH EXIT STATUS") + 4)]
    codes = {"0", "1", "2", "80", "81", "82", "83", "84", "85", "86", "130"}
    assert set(re.findall(r"\b(\d+)\b", help_status)) == codes
    assert set(re.findall(r"^\.B (\d+)$", man_status, re.M)) == codes
    # the files and the environment
    for word in ["XDG_STATE_HOME", "XDG_RUNTIME_DIR", "history", "libedit"]:
        assert word in man
    assert "XDG_STATE_HOME" in help_text


def test_version_names_the_release():
    r = run_cli("--version")
    assert r.returncode == 0
    assert re.fullmatch(rb"manhole-cli \d+\.\d+\.\d+\n", r.stdout)


@pytest.mark.parametrize("args, says", [
    (["--bogus"], "unknown or incomplete option --bogus"),
    (["--timeout", "soon", "x"], "--timeout: not a positive number of seconds: soon"),
    ([], "no target: give a socket PATH, HOST:PORT or a PID"),
    (["a", "b"], "one target only (extra argument: b)"),
    (["--list", "x"], "--list takes no target"),
    (["-c"], "-c needs the code to run"),
])
def test_bad_usage_says_why_and_exits_2(args, says):
    r = run_cli(*args)
    assert r.returncode == 2
    first, rest = err_line(r).split("\n", 1)
    assert first == "manhole-cli: " + says
    assert rest.startswith("usage: manhole-cli")


# ---- Without a terminal: script mode and -c ---------------------------------

def test_script_prints_only_its_output(demo):
    r = run_cli(demo.unix_path, input=b"x = 20\nx + 1\nprint(x * 2)\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"40\n", b"")


def test_command_output_is_byte_exact(demo):
    code = (r"import sys; sys.stdout.write('caf\u00e9\tx\r\n\x00end');"
            r" sys.stdout.flush(); sys.stdout.buffer.write(b'\xff\xfe\xff'); sys.stdout.flush()")
    r = run_cli("-c", code, demo.unix_path)
    assert r.returncode == 0
    assert r.stdout == "café\tx\r\n\x00end".encode() + b"\xff\xfe\xff"


def test_large_output_is_byte_exact(demo):
    code = "import sys\nfor i in range(20000):\n    sys.stdout.write('%06d ' % i + 'x' * 50 + '\\n')"
    r = run_cli("-c", code, demo.unix_path)
    assert r.returncode == 0
    assert r.stdout == b"".join(b"%06d " % i + b"x" * 50 + b"\n" for i in range(20000))


def test_a_statement_that_raises_exits_1_with_its_traceback(demo):
    # the traceback on stderr, as python -c prints it; stdout stays clean
    r = run_cli("-c", "x = 1\nraise KeyError('k')", demo.unix_path)
    assert r.returncode == 1
    assert r.stdout == b""
    assert r.stderr.decode() == ("Traceback (most recent call last):\n"
                                 '  File "<string>", line 2, in <module>\n'
                                 "KeyError: 'k'\n")
    r = run_cli(demo.unix_path, input=b"print('before')\n1 / 0\nprint('after')\n")
    assert r.returncode == 1
    assert r.stdout == b"before\n"
    err = r.stderr.decode()
    assert err.startswith("Traceback (most recent call last):\n")
    assert '  File "<stdin>", line 2, in <module>\n' in err
    assert err.endswith("ZeroDivisionError: division by zero\n")
    assert "after" not in r.stdout.decode() + err


def test_a_syntax_error_exits_1(demo):
    r = run_cli("-c", "def f(:", demo.unix_path)
    assert r.returncode == 1
    assert r.stdout == b""
    assert r.stderr.decode().startswith('  File "<string>", line 1\n')
    assert r.stderr.decode().endswith("SyntaxError: invalid syntax\n")


def test_sys_exit_status_is_the_clients_and_the_hosts(start):
    p = start(DEMO)
    r = run_cli("-c", "print('bye'); import sys; sys.exit(3)", p.unix_path)
    assert (r.returncode, r.stdout) == (3, b"bye\n")
    assert p.wait() == 3


def test_command_reads_input_from_standard_input(demo):
    r = run_cli("-c", "a = input('q? '); print(a.upper())", demo.unix_path, input=b"hello\nrest\n")
    assert (r.returncode, r.stdout) == (0, b"q? HELLO\n")


def test_a_script_reading_input_meets_the_end_of_input(demo):
    r = run_cli(demo.unix_path, input=b"x = input()\n")
    assert r.returncode == 1
    assert r.stderr.decode().endswith("EOFError: EOF when reading a line\n")


def test_scripts_leave_the_host_and_its_state(demo):
    assert run_cli("-c", "kept = 5", demo.unix_path).returncode == 0
    r = run_cli("-c", "print(kept * ticks >= 0, kept)", demo.unix_path)
    assert r.stdout == b"True 5\n"
    assert demo.p.poll() is None


# ---- Connecting --------------------------------------------------------------

def test_connect_by_pid(demo):
    r = run_cli("-c", "print(demo_add(2, 3))", demo.p.pid)
    assert (r.returncode, r.stdout) == (0, b"5\n")


def test_path_picks_the_socket_of_a_pid(demo):
    r = run_cli("--path", demo.unix_path, "-c", "print(7)", demo.p.pid)
    assert (r.returncode, r.stdout) == (0, b"7\n")


def test_connect_by_tcp_with_the_secret_where_the_host_put_it(start):
    p = start(DEMO, "--port", "0")
    assert default_secret_path(p.tcp_port).exists()
    r = run_cli("-c", "print(ticks >= 0)", "127.0.0.1:%d" % p.tcp_port)
    assert (r.returncode, r.stdout) == (0, b"True\n")


def test_connect_by_tcp_with_a_secret_file(start, sockdir):
    secret = sockdir / "secret"
    p = start(DEMO, "--port", "0", "--secret-file", secret, path=False)
    r = run_cli("--secret-file", secret, "-c", "print('in')", ":%d" % p.tcp_port)
    assert (r.returncode, r.stdout) == (0, b"in\n")


def test_wrong_secret_exits_84(start, sockdir):
    p = start(DEMO, "--port", "0")
    bad = sockdir / "bad"
    bad.write_text("0" * 64 + "\n")
    r = run_cli("--secret-file", bad, "-c", "print(1)", "127.0.0.1:%d" % p.tcp_port)
    assert r.returncode == 84
    assert err_line(r) == ("manhole-cli: 127.0.0.1:%d: authentication failed (wrong or missing "
                           "secret); the secret was read from %s\n" % (p.tcp_port, bad))
    assert r.stdout == b""


def test_missing_secret_file_exits_80(start, sockdir):
    p = start(DEMO, "--port", "0")
    r = run_cli("--secret-file", sockdir / "none", "-c", "1", "127.0.0.1:%d" % p.tcp_port)
    assert r.returncode == 80
    assert err_line(r) == "manhole-cli: secret file %s: No such file or directory\n" % (
        sockdir / "none")


def test_list_shows_each_manhole_with_pid_command_and_path(start, sockdir):
    a = start(DEMO, "--path", sockdir / "a")
    b = start(DEMO, "--path", sockdir / "b")
    r = run_cli("--list", "--timeout", TIMEOUT / 2)
    assert r.returncode == 0
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["PID", "COMMAND", "PATH"]
    rows = {int(pid): (comm, path) for pid, comm, path in (l.split(None, 2) for l in lines[1:])}
    for p, name in [(a, "a"), (b, "b")]:
        comm, path = rows[p.p.pid]
        assert path == str(sockdir / name)
        if not WRAP:
            assert comm == "manhole-demo"


def test_a_pid_with_several_manholes_lists_them_and_asks_for_path(start, sockdir):
    f = start(*fake_server_argv(sockdir / "m1", sockdir / "m2"), path=False)
    r = run_cli("-c", "1", f.p.pid)
    assert r.returncode == 2
    lines = err_line(r).splitlines()
    assert re.fullmatch(r"manhole-cli: process %d \(\S+\) has 2 manholes; choose one with --path:"
                        % f.p.pid, lines[0])
    assert lines[1:] == ["  manhole-cli --path %s %d" % (sockdir / m, f.p.pid) for m in ["m1", "m2"]]


def test_a_pid_whose_sockets_do_not_answer_exits_86(start, sockdir):
    f = start(*fake_server_argv("--silent", sockdir / "q1", sockdir / "q2"), path=False)
    r = run_cli("--timeout", "0.5", "-c", "1", f.p.pid)
    assert r.returncode == 86
    assert re.fullmatch(r"manhole-cli: process %d \(\S+\) listens on 2 UNIX sockets but none "
                        r"answered as a manhole\n" % f.p.pid, err_line(r))


# ---- Every error: one line, its own exit status ------------------------------

def test_no_such_socket_exits_80(sockdir):
    r = run_cli("-c", "1", sockdir / "nothing")
    assert r.returncode == 80
    assert err_line(r) == "manhole-cli: %s: no such socket\n" % (sockdir / "nothing")


def test_no_such_process_exits_80():
    p = subprocess.Popen(["true"])
    p.wait()
    r = run_cli("-c", "1", p.pid)
    assert r.returncode == 80
    assert err_line(r) == "manhole-cli: no process with pid %d\n" % p.pid


def test_a_process_without_a_manhole_exits_80():
    p = subprocess.Popen(["sleep", "60"])
    try:
        r = run_cli("-c", "1", p.pid)
    finally:
        p.kill()
        p.wait()
    assert r.returncode == 80
    assert err_line(r) == ("manhole-cli: process %d (sleep) has no manhole: it listens on no UNIX "
                           "socket (a TCP-only manhole needs HOST:PORT)\n" % p.pid)


def test_connection_refused_exits_81(sockdir):
    path = sockdir / "dead"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # a socket file nobody listens on
    try:
        r = run_cli("-c", "1", path)
    finally:
        s.close()
    assert r.returncode == 81
    assert err_line(r) == ("manhole-cli: %s: connection refused (nothing listens there; has the "
                           "host exited?)\n" % path)


def test_tcp_connection_refused_exits_81():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # bound, not listening
    try:
        r = run_cli("--secret-file", "/dev/null", "-c", "1", "127.0.0.1:%d" % port)
    finally:
        s.close()
    assert r.returncode == 81
    assert "connection refused" in err_line(r)


@as_root
def test_permission_denied_exits_82(demo):
    r = run_cli("-c", "1", demo.unix_path, user=NOBODY)
    assert r.returncode == 82
    assert err_line(r) == "manhole-cli: %s: permission denied\n" % demo.unix_path


@as_root
def test_another_users_process_by_pid_is_permission_denied(demo):
    r = run_cli("-c", "1", demo.p.pid, user=NOBODY)
    assert r.returncode == 82
    assert err_line(r).startswith("manhole-cli: cannot read /proc/%d/fd: permission denied"
                                  % demo.p.pid)
    assert err_line(r).count("\n") == 1


@as_root
def test_refused_by_the_manhole_exits_83(start):
    p = start(DEMO, "--mode", "666")  # others may connect; their uid is refused
    r = run_cli("-c", "1", p.unix_path, user=NOBODY)
    assert r.returncode == 83
    assert err_line(r) == ("manhole-cli: %s: the manhole refused this client: access denied\n"
                           % p.unix_path)


def test_too_many_clients_exits_83(start):
    p = start(DEMO, "--max-clients", "1")
    held = p.client()
    r = run_cli("-c", "1", p.unix_path)
    assert r.returncode == 83
    assert re.fullmatch(r"manhole-cli: %s: the manhole refused this client: too many clients.*\n"
                        % re.escape(p.unix_path), err_line(r))
    held.close()


def test_server_closing_mid_script_exits_85(demo):
    r = run_cli("-c", "import os; os._exit(0)", demo.unix_path)
    assert r.returncode == 85
    assert err_line(r) == "manhole-cli: %s: the server closed the connection\n" % demo.unix_path


def test_not_a_socket_exits_86(sockdir):
    f = sockdir / "file"
    f.write_text("not a socket\n")
    r = run_cli("-c", "1", f)
    assert r.returncode == 86
    assert err_line(r) == "manhole-cli: %s: not a socket\n" % f


def test_a_socket_that_never_answers_exits_86(start, sockdir):
    start(*fake_server_argv("--silent", sockdir / "mute"), path=False)
    r = run_cli("--timeout", "0.5", "-c", "1", sockdir / "mute")
    assert r.returncode == 86
    assert err_line(r) == ("manhole-cli: %s: no answer to the manhole hello within 0.5 s (not a "
                           "manhole, or its host is not running its loop)\n" % (sockdir / "mute"))


# ---- At the prompt: a pseudo-terminal ----------------------------------------

def test_banner_and_prompts_come_from_the_server(start, term):
    p = start(DEMO, "--banner", "Hello from the host")
    t = term(p.unix_path)
    t.tail_is("Hello from the host\n>>> ")
    t.send("import sys; sys.ps1 = 'py> '; sys.ps2 = '.. '\r")
    t.wait_cursor("py> ")
    t.send("if 1:\r")
    t.wait_cursor(".. ")
    t.send("  7\r")
    t.wait_cursor(".. ")
    t.send("\r")
    t.tail_is("py> if 1:\n..   7\n..\n7\npy> ")
    assert t.screen.text().count("Hello from the host") == 1


def test_editing_keys(demo, term):
    t = term(demo.unix_path)
    t.wait_cursor(">>> ")
    t.send("x = 'helo wrld'")
    t.wait_cursor(">>> x = 'helo wrld'")
    t.send(LEFT * 4 + "o")           # before "rld'": w|rld -> world
    t.wait_cursor(">>> x = 'helo wo")
    t.send("\x01" + RIGHT * 8 + "l")  # Ctrl-A, then after "x = 'hel"
    t.wait_cursor(">>> x = 'hell")
    t.send("\x05\r")                  # Ctrl-E, Enter
    t.cmd("x", "'hello world'\n")
    t.send("yy = 12345\x7f\x7f")      # Backspace twice
    t.wait_cursor(">>> yy = 123")
    t.send("\x01\x04\r")              # Ctrl-A; Ctrl-D on a non-empty line deletes a character
    t.wait(r">>> y = 123\n>>>\Z")
    t.cmd("y", "123\n")
    t.cmd("x[:4]", "'hell'\n")
    t.send(UP * 4)                    # history within the session
    t.wait_cursor(">>> x")
    t.send("\r")
    t.wait(r">>> x\n'hello world'\n>>>\Z")


def test_history_is_recalled_in_a_second_run(demo, term, state):
    t = term(demo.unix_path)
    t.cmd("first = 1")
    t.block(["def twice(v):", "    return 2 * v"])
    t.cmd("twice(first)", "2\n")
    t.ctrl_d()
    assert t.wait_exit() == 0
    hist = state / "manhole" / "history"
    assert stat.S_IMODE(hist.stat().st_mode) == 0o600
    assert stat.S_IMODE(hist.parent.stat().st_mode) == 0o700

    t2 = term(demo.unix_path)
    t2.cmd("del twice")
    t2.send(UP + UP)
    t2.wait_cursor(">>> twice(first)")
    t2.send(UP)  # the block is one entry, recalled whole
    t2.wait(r">>> def twice\(v\):\n    return 2 \* v\Z")
    t2.wait_cursor("    return 2 * v")
    t2.send("\r")
    t2.wait_cursor(">>> ")
    t2.cmd("twice(21)", "42\n")


def test_history_file_is_bounded(demo, term, state):
    hist = state / "manhole" / "history"
    hist.parent.mkdir(parents=True)
    hist.write_text("_HiStOrY_V2_\n" + "".join("old_%d\n" % i for i in range(1500)))
    t = term(demo.unix_path)
    t.cmd("new_entry = 1")
    t.ctrl_d()
    assert t.wait_exit() == 0
    lines = hist.read_text().splitlines()
    assert lines[0] == "_HiStOrY_V2_"
    assert len(lines) - 1 == 1000
    assert lines[1] == "old_501" and lines[-1] == "new_entry\\040=\\0401"


def test_no_history_writes_no_file(demo, term, state):
    t = term("--no-history", demo.unix_path)
    t.cmd("z = 1")
    t.ctrl_d()
    assert t.wait_exit() == 0
    assert not (state / "manhole" / "history").exists()


def test_tab_completes_a_name_an_attribute_and_a_host_binding(demo, term):
    t = term(demo.unix_path)
    t.wait_cursor(">>> ")
    t.send("demo_a\t")                        # a C function of the host
    t.wait_cursor(">>> demo_add(")
    t.send("2, 3)\r")
    t.wait(r">>> demo_add\(2, 3\)\n5\n>>>\Z")
    t.cmd("import collections")
    t.send("collections.OrderedD\t")          # an attribute
    t.wait_cursor(">>> collections.OrderedDict(")
    t.send(")\r")
    t.wait(r"OrderedDict\(\)\n>>>\Z")
    t.send("tic\t")                           # a live binding of a C variable
    t.wait_cursor(">>> ticks")
    t.send("\r")
    t.wait(r">>> ticks\n\d+\n>>>\Z")
    t.send("\t")                              # on an empty line: indentation
    t.wait_cursor(">>>     ")


def test_double_tab_lists_the_candidates(demo, term):
    t = term(demo.unix_path)
    t.wait_cursor(">>> ")
    t.send("de\t")
    t.send("\t")
    t.wait(r"demo_add\(.*\n>>> de\Z")
    t.wait_cursor(">>> de")
    lines = t.screen.text().splitlines()
    listing = " ".join(lines[lines.index(">>> de") + 1:-1]).split()
    assert listing == ["def", "del", "delattr(", "demo_add("]
    t.send("mo_add(1, 1)\r")
    t.wait(r">>> demo_add\(1, 1\)\n2\n>>>\Z")


def test_ctrl_c_interrupts_a_running_statement_and_keeps_the_session(start, term):
    p = start(DEMO, "--timeout", "0")  # only the interrupt can stop it
    t = term(p.unix_path)
    t.cmd("kept = 'still here'")
    t.block(["def spin():", "    print('spinning')", "    while True:", "        pass"])
    t.send("spin()\r")
    t.wait(r">>> spin\(\)\nspinning\Z")
    t.ctrl_c()
    t.wait(r"spinning\nTraceback \(most recent call last\):\n.*\nKeyboardInterrupt\n>>>\Z")
    t.cmd("kept", "'still here'\n")


def test_ctrl_c_at_the_prompt_clears_the_line(demo, term):
    t = term(demo.unix_path)
    t.wait_cursor(">>> ")
    t.send("half typed")
    t.wait_cursor(">>> half typed")
    t.ctrl_c()
    t.tail_is(">>> half typed\nKeyboardInterrupt\n>>> ")
    t.cmd("1 + 1", "2\n")


def test_ctrl_c_in_a_block_drops_the_block(demo, term):
    t = term(demo.unix_path)
    t.wait_cursor(">>> ")
    t.send("if True:\r")
    t.wait_cursor("... ")
    t.send("    dropped = 1\r")
    t.tail_is(">>> if True:\n...     dropped = 1\n... ")
    t.ctrl_c()
    t.tail_is(">>> if True:\n...     dropped = 1\n...\nKeyboardInterrupt\n>>> ")
    t.cmd("'dropped' in dir()", "False\n")


def test_ctrl_d_leaves_and_the_host_keeps_running(demo, term):
    t = term(demo.unix_path)
    t.cmd("left_behind = 11")
    t.ctrl_d()
    assert t.wait_exit() == 0
    assert demo.p.poll() is None
    assert demo.client().cmd("left_behind") == "11\n"


def test_exit_leaves_and_the_host_keeps_running(demo, term):
    t = term(demo.unix_path)
    t.send("exit()\r")
    assert t.wait_exit() == 0
    assert demo.p.poll() is None
    assert demo.client().cmd("1") == "1\n"


def test_sys_exit_at_the_prompt_is_the_clients_status_and_the_hosts(start, term):
    p = start(DEMO)
    t = term(p.unix_path)
    t.wait_cursor(">>> ")
    t.send("import sys; sys.exit(4)\r")
    assert t.wait_exit() == 4
    assert p.wait() == 4


def test_host_gone_at_the_prompt_exits_85_with_a_line(start, term):
    p = start(DEMO)
    t = term(p.unix_path)
    t.wait_cursor(">>> ")
    p.signal(signal.SIGTERM)
    assert t.wait_exit() == 85
    assert "manhole-cli: %s: the server closed the connection" % p.unix_path in t.screen.text()


def test_output_from_a_thread_appears_above_the_line_being_edited(demo, term):
    t = term(demo.unix_path)
    t.cmd("import threading; go = threading.Event()")
    t.block(["def later():", "    go.wait()", "    print('from the thread')"])
    t.cmd("threading.Thread(target=later).start()")
    t.send("s = 'typed so far")
    t.wait_cursor(">>> s = 'typed so far")
    demo.client().cmd("go.set()")  # another client releases the thread
    t.tail_is(">>> threading.Thread(target=later).start()\nfrom the thread\n>>> s = 'typed so far")
    t.send(" and after'\r")
    t.cmd("s", "'typed so far and after'\n")


def test_input_is_answered_at_its_own_prompt(demo, term):
    t = term(demo.unix_path)
    t.wait_cursor(">>> ")
    t.send("name = input('Your name? ')\r")
    t.wait_cursor("Your name? ")
    t.send("Ada\r")
    t.cmd("name", "'Ada'\n")
    t.send("input('more? ')\r")
    t.send("x")                       # shown once input() asks for a line
    t.wait_cursor("more? x")
    t.ctrl_c()
    t.wait(r"more\? x\nTraceback \(most recent call last\):\n.*KeyboardInterrupt\n>>>\Z")
    t.cmd("name", "'Ada'\n")


def test_pdb_from_the_prompt(demo, term):
    t = term(demo.unix_path)
    t.block(["def g():", "    a = 41", "    import pdb; pdb.set_trace()", "    return a + 1"])
    t.send("g()\r")
    t.wait_cursor("(Pdb) ")
    t.send("p a\r")
    t.wait(r"\(Pdb\) p a\n41\n\(Pdb\)\Z")
    t.send("c\r")
    t.tail_is("(Pdb) c\n42\n>>> ")


def test_a_pasted_function_with_blank_lines_runs_as_meant(demo, term):
    t = term(demo.unix_path)
    t.wait_cursor(">>> ")
    t.send(PASTED.replace("\n", "\r"))  # as a terminal sends a paste
    t.tail_is(PASTED_SCREEN + " ")


def test_a_bracketed_paste_runs_as_meant(demo, term):
    t = term(demo.unix_path)
    t.wait_cursor(">>> ")
    t.send("\x1b[200~" + PASTED.replace("\n", "\r") + "\x1b[201~")
    t.tail_is(PASTED_SCREEN + " ")
    # the unfinished last line of a paste stays on the line for editing
    t.send("\x1b[200~a = 1\rb = 2\x1b[201~")
    t.wait_cursor(">>> b = 2")
    t.send("0\r")
    t.cmd("a + b", "21\n")


def test_lines_typed_while_a_statement_runs_follow_it(start, term):
    p = start(DEMO, "--timeout", "0")
    t = term(p.unix_path)
    t.cmd("import threading; gate = threading.Event()")
    t.send("gate.wait()\r")
    t.wait(r">>> gate.wait\(\)\Z")
    t.send("after = 1\rafter + 1\r")  # typed ahead: held until the prompt
    demo_client = p.client()
    demo_client.cmd("gate.set()")
    t.tail_is(">>> gate.wait()\nTrue\n>>> after = 1\n>>> after + 1\n2\n>>> ")


def test_interactive_session_by_pid_and_over_tcp(start, term):
    p = start(DEMO, "--port", "0")
    t = term(p.p.pid)
    t.cmd("demo_add(20, 22)", "42\n")
    t2 = term("127.0.0.1:%d" % p.tcp_port)
    t2.cmd("demo_add(1, 2)", "3\n")


def test_output_above_a_line_that_wraps_keeps_the_whole_line(demo, term):
    t = term(demo.unix_path)
    t.cmd("import threading; go = threading.Event()")
    t.block(["def later():", "    go.wait()", "    print('from the thread')"])
    t.cmd("threading.Thread(target=later).start()")
    long = "v = '" + "abcdefghij" * 10 + "'"  # two rows of 80 columns
    t.send(long)
    rows = re.escape((">>> " + long)[:80]) + r"\n" + re.escape((">>> " + long)[80:])
    t.wait(rows + r"\Z")
    demo.client().cmd("go.set()")
    t.wait(r"start\(\)\nfrom the thread\n" + rows + r"\Z")
    t.wait_cursor((">>> " + long)[80:])
    t.send("\r")
    t.cmd("len(v)", "100\n")



def test_output_without_a_line_end_is_followed_by_the_prompt(demo, term):
    t = term(demo.unix_path)
    t.wait_cursor(">>> ")
    t.send("print('partial', end='')\r")
    t.wait_cursor("partial>>> ")  # as python3 -i shows it
    t.send("1 + 1\r")
    t.tail_is(">>> print('partial', end='')\npartial>>> 1 + 1\n2\n>>> ")


def test_the_terminal_is_left_as_it_was_found(demo, tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    cli = " ".join(shlex.quote(str(a)) for a in WRAP + [CLI, "--no-history", demo.unix_path])
    script = "stty -a > %s; %s; echo status=$?; stty -a > %s" % (before, cli, after)
    env = dict(os.environ, TERM="xterm", LC_ALL="C.UTF-8")
    p = pexpect.spawn("sh", ["-c", script], env=env, dimensions=(24, 80))
    p.logfile_read = seen = io.BytesIO()
    try:
        p.expect_exact(">>> ", timeout=TIMEOUT)
        p.send("x = 1\r")
        p.expect_exact(">>> ", timeout=TIMEOUT)
        p.send("\x04")
        p.expect_exact("status=0", timeout=TIMEOUT)
        p.expect(pexpect.EOF, timeout=TIMEOUT)
        shown = seen.getvalue()  # bracketed paste was turned off again
        assert shown.rfind(b"\x1b[?2004l") > shown.rfind(b"\x1b[?2004h") > 0
    finally:
        p.close(force=True)
    assert after.read_text() == before.read_text()
