"""manhole-cli against servers it must not trust (issue 15, client side).

Each test is named after what used to go wrong. The servers here are fake
and hostile where that matters: a Python socket server in a thread of the
test, speaking whatever bytes the test likes and keeping every byte the
client sent, so a test can say "the client sent it nothing". The TCP
challenge-response of wire.h is implemented here with hmac, independently
of the C code. Crashes are checked through a real pseudo-terminal
(pexpect), memory through the client's own peak RSS (a generous bound, no
timing). Everything synchronises on output, with deadlines."""
import hashlib
import hmac
import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pexpect
import pytest

from cli_util import CLI, Term, run_cli
from conftest import DEMO, REPORT, SANITIZER, TIMEOUT, WRAP, Timeout

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs a second uid (runs as root)")
IAC, SB, SE = 0xFF, 0xFA, 0xF0
# A generous bound on the client's peak RSS against a flood (the client
# used to hold all of it: hundreds of MB); ASan keeps up to 256 MB of freed
# memory in quarantine.
RSS_BOUND_MB = 600 if SANITIZER else 100
measures_rss = pytest.mark.skipif(bool(WRAP), reason="valgrind's RSS is not the client's")


def rec(kind, payload=b""):
    """A record of the extended channel: IAC SB 77 <kind> <payload> IAC SE."""
    return bytes([IAC, SB, 77]) + kind + payload.replace(b"\xff", b"\xff\xff") + bytes([IAC, SE])


HELLO = rec(b"H", b"1")


class Fake:
    """A server in a thread. `talk(conn, fake)` runs for each connection;
    every byte a client sent is kept in `received`, connections are
    counted in `accepted`."""

    def __init__(self, talk, family=socket.AF_UNIX, addr=None):
        self.talk = talk
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(addr)
        self.sock.listen(8)
        self.addr = self.sock.getsockname()
        self.received = bytearray()
        self.accepted = 0
        self.errors = []
        self.stop = threading.Event()
        self.cv = threading.Condition()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._talk, args=(c,), daemon=True).start()

    def _talk(self, c):
        c.settimeout(TIMEOUT)
        try:
            self.talk(c, self)
        except (OSError, EOFError):
            pass  # the client left
        except Exception as e:  # an assertion of the fake: reported by the test
            self.errors.append(e)
        finally:
            c.close()

    def recv(self, c, n=65536):
        d = c.recv(n)
        if not d:
            raise EOFError
        with self.cv:
            self.received.extend(d)
            self.cv.notify_all()
        return d

    def read_until(self, c, marker):
        data = bytearray()
        while marker not in data:
            data.extend(self.recv(c))
        return bytes(data)

    def read_exact(self, c, n):
        data = bytearray()
        while len(data) < n:
            data.extend(self.recv(c, n - len(data)))
        return bytes(data)

    def drain(self, c):
        while True:
            self.recv(c)

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture
def fakes():
    made = []

    def make(talk, **kw):
        f = Fake(talk, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()
    for f in made:
        assert not f.errors, f.errors


@pytest.fixture
def unix_fake(fakes, sockdir):
    return lambda talk: fakes(talk, addr=str(sockdir / "fake"))


def greet(c, f, prompt=b">>> "):
    """The manhole's side of the hello: banner, prompt, H reply, P."""
    c.sendall(b"banner\n" + prompt)
    f.read_until(c, HELLO)
    c.sendall(HELLO + rec(b"P", b"1" + prompt))


def flood(c, head, chunk, total):
    """head, then chunk until total bytes went out or the client left."""
    c.sendall(head)
    sent = 0
    while sent < total:
        try:
            c.sendall(chunk)
        except OSError:
            return
        sent += len(chunk)


def run_measured(*args, env=None, input=b""):
    """Run the client; (returncode, stdout, stderr, peak RSS in MB) of that
    one process (wait4's rusage, not every child's)."""
    full_env = dict(os.environ, **(env or {}))
    p = subprocess.Popen(WRAP + [str(CLI)] + [str(a) for a in args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
    out, err = bytearray(), bytearray()

    def pump(f, sink):
        for chunk in iter(lambda: f.read1(1 << 20), b""):
            sink.extend(chunk)

    readers = [threading.Thread(target=pump, args=(p.stdout, out), daemon=True),
               threading.Thread(target=pump, args=(p.stderr, err), daemon=True)]
    for t in readers:
        t.start()
    try:
        p.stdin.write(input)
        p.stdin.close()
    except BrokenPipeError:
        pass
    deadline = time.monotonic() + TIMEOUT * 3
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            p.kill()
            raise Timeout("the client did not exit")
        time.sleep(0.05)  # polling for the exit of a process: no other way to get its rusage
    p.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join(TIMEOUT)
    text = err.decode(errors="replace")
    assert not REPORT.search(text), text
    return p.returncode, bytes(out), text, ru.ru_maxrss / 1024


def one_line(text):
    assert text.count("\n") == 1 and text.endswith("\n"), repr(text)
    assert text.startswith("manhole-cli: "), repr(text)
    return text


# ---- Point 1: the TCP secret goes to no peer that has not been identified --

SECRET = b"5e" * 32


def endpoint(sockname):
    host, port = sockname[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def proof(secret, side, cnonce, snonce, ep):
    msg = b"manhole-auth-1 %s\n%s\n%s\n%s" % (side, cnonce, snonce, ep.encode())
    return hmac.new(secret, msg, hashlib.sha256).hexdigest().encode()


def auth(c, f, secret=SECRET, how="right"):
    """The server's side of wire.h's challenge-response; `how` cheats."""
    first = f.read_exact(c, 4 + 2 + 32 + 2)
    assert first[:6] == b"\xff\xfa\x4dA1 " and first[-2:] == b"\xff\xf0", first
    cnonce = first[6:38]
    assert re.fullmatch(rb"[0-9a-f]{32}", cnonce), cnonce
    if how == "plain":
        c.sendall(b"Password: ")
        f.stop.wait()
        return
    if how == "silent":
        f.stop.wait()
        return
    if how == "close":
        return
    snonce = os.urandom(16).hex().encode()
    ep = endpoint(c.getsockname())
    if how == "relayed":  # a proof made for another endpoint
        ep = "127.0.0.1:1"
    key = b"not the secret" if how == "wrong" else secret
    c.sendall(rec(b"A", b"1 " + snonce + b" " + proof(key, b"server", cnonce, snonce, ep)))
    if how != "right":
        f.stop.wait()
        return
    got = f.read_exact(c, 4 + 64 + 2)
    assert got == rec(b"A", proof(secret, b"client", cnonce, snonce, ep)), got


def tcp_session(c, f):
    """Authenticate, greet, run one E record as 'print("in")' would."""
    auth(c, f)
    greet(c, f)
    f.read_until(c, b"\xff\xf0")
    c.sendall(b"in\n" + rec(b"S", b"0") + rec(b"P", b"1>>> "))
    f.stop.wait()


@pytest.fixture
def runtime(tmp_path):
    """XDG_RUNTIME_DIR for the client, with its manhole directory."""
    d = tmp_path / "run"
    (d / "manhole").mkdir(parents=True, mode=0o700)
    return d


def write_secret(runtime, ep, secret=SECRET):
    path = runtime / "manhole" / ("tcp-%s.secret" % ep)
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return path


def test_tcp_client_proves_it_knows_the_secret_and_never_sends_it(fakes, runtime):
    f = fakes(tcp_session, family=socket.AF_INET, addr=("127.0.0.1", 0))
    write_secret(runtime, endpoint(f.addr))
    r = run_cli("-c", "print('in')", "127.0.0.1:%d" % f.addr[1],
                env={"XDG_RUNTIME_DIR": str(runtime)})
    assert (r.returncode, r.stdout, r.stderr) == (0, b"in\n", b"")
    assert SECRET not in f.received


@pytest.mark.parametrize("how", ["wrong", "relayed", "plain", "silent", "close"])
def test_tcp_server_that_does_not_prove_the_secret_gets_nothing(fakes, runtime, how):
    f = fakes(lambda c, fk: auth(c, fk, how=how), family=socket.AF_INET, addr=("127.0.0.1", 0))
    secret_file = write_secret(runtime, endpoint(f.addr))
    target = "127.0.0.1:%d" % f.addr[1]
    r = run_cli("--timeout", "1", "-c", "print('in')", target,
                env={"XDG_RUNTIME_DIR": str(runtime)})
    err = one_line(r.stderr.decode())
    assert r.returncode == 84, err
    assert "nothing was sent" in err or "authentication failed" in err
    if how in ("wrong", "relayed"):
        assert err == ("manhole-cli: %s: authentication failed (wrong or missing secret); the "
                       "secret was read from %s\n" % (target, secret_file))
    if how == "plain":
        assert '(it sent "Password: ")' in err
    # the client's nonce, and then nothing: no secret, no proof, no hello
    assert len(f.received) == 40 and SECRET not in f.received


@pytest.mark.parametrize("elsewhere", ["::1", "127.0.0.2"])
def test_tcp_secret_of_one_address_is_never_sent_to_another(fakes, runtime, elsewhere):
    squatter = fakes(lambda c, fk: fk.read_until(c, b"\n"),
                     family=socket.AF_INET6 if ":" in elsewhere else socket.AF_INET,
                     addr=(elsewhere, 0))
    port = squatter.addr[1]
    write_secret(runtime, "127.0.0.1:%d" % port)  # the host's, on 127.0.0.1
    write_secret(runtime, "%d" % port)            # as 0.5.0 named it
    target = "[%s]:%d" % (elsewhere, port) if ":" in elsewhere else "%s:%d" % (elsewhere, port)
    r = run_cli("--timeout", "1", "-c", "1", target, env={"XDG_RUNTIME_DIR": str(runtime)})
    assert r.returncode == 80, r.stderr
    assert squatter.accepted == 0 and not squatter.received


def test_tcp_wildcard_secret_file_serves_its_family(fakes, runtime):
    f = fakes(tcp_session, family=socket.AF_INET, addr=("127.0.0.1", 0))
    write_secret(runtime, "0.0.0.0:%d" % f.addr[1])
    r = run_cli("-c", "print('in')", ":%d" % f.addr[1], env={"XDG_RUNTIME_DIR": str(runtime)})
    assert (r.returncode, r.stdout) == (0, b"in\n"), r.stderr


LISTENER_AS_NOBODY = r"""
import os, socket, sys
os.setgid(65534); os.setuid(65534)  # first: a socket is its creator's
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.settimeout(%r)
got = b""
try:
    while True:
        d = c.recv(4096)
        if not d:
            break
        got += d
except OSError:
    pass
print(repr(got), flush=True)
"""


@as_root
def test_tcp_listener_of_another_user_gets_nothing(runtime):
    """Another user listening on the port of the host's secret: the client
    sees it in /proc/net/tcp and sends nothing, not even a nonce."""
    p = subprocess.Popen([sys.executable, "-c", LISTENER_AS_NOBODY % (TIMEOUT,)],
                         stdout=subprocess.PIPE)
    try:
        port = int(p.stdout.readline())
        write_secret(runtime, "127.0.0.1:%d" % port)
        r = run_cli("--timeout", "2", "-c", "1", "127.0.0.1:%d" % port,
                    env={"XDG_RUNTIME_DIR": str(runtime)})
        got = p.stdout.readline().decode().strip()
    finally:
        p.kill()
        p.wait()
    err = one_line(r.stderr.decode())
    assert r.returncode == 84
    assert ("the listener on 127.0.0.1:%d belongs to uid %d, not to the secret's owner (uid %d);"
            " nothing was sent" % (port, NOBODY, os.geteuid())) in err
    assert got == "b''"


@pytest.mark.parametrize("content", [b"", b"a" * 129 + b"\n", b"ab\0cd\n"])
def test_a_secret_file_without_a_secret_line_is_refused(fakes, runtime, content):
    f = fakes(lambda c, fk: auth(c, fk), family=socket.AF_INET, addr=("127.0.0.1", 0))
    path = write_secret(runtime, endpoint(f.addr), content)
    r = run_cli("-c", "1", "127.0.0.1:%d" % f.addr[1], env={"XDG_RUNTIME_DIR": str(runtime)})
    err = one_line(r.stderr.decode())
    assert r.returncode == 84
    assert str(path) in err
    assert not f.received  # (an empty one is found out after connecting, before sending)


def test_secret_path_prints_the_file_of_each_address(runtime, tmp_path):
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    own = write_secret(runtime, "127.0.0.1:7000")
    any4 = write_secret(runtime, "0.0.0.0:7001")
    for arg, want in [("127.0.0.1:7000", own), ("7000", own), (":7000", own),
                      ("127.0.0.1:7001", any4)]:
        r = run_cli("--secret-path", arg, env=env)
        assert (r.returncode, r.stdout.decode(), r.stderr) == (0, "%s\n" % want, b"")
    r = run_cli("--secret-path", "[::1]:7000", env=env)
    assert r.returncode == 80
    d = runtime / "manhole"
    assert r.stderr.decode() == (
        "manhole-cli: no secret file for [::1]:7000 (looked in %s/tcp-[::1]:7000.secret, "
        "%s/tcp-[::]:7000.secret); is the host listening there? give --secret-file\n" % (d, d))


def test_tcp_against_the_demo_uses_the_secret_file_of_its_address(start, runtime):
    p = start(DEMO, "--port", "0", env={"XDG_RUNTIME_DIR": str(runtime)})
    files = sorted(x.name for x in (runtime / "manhole").iterdir())
    if files == ["tcp-%d.secret" % p.tcp_port]:
        pytest.skip("this server names its secret by port (before the sec branch)")
    assert files == ["tcp-127.0.0.1:%d.secret" % p.tcp_port]
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    r = run_cli("-c", "print(demo_add(2, 3))", "127.0.0.1:%d" % p.tcp_port, env=env)
    assert (r.returncode, r.stdout) == (0, b"5\n"), r.stderr
    r = run_cli("--secret-path", str(p.tcp_port), env=env)
    assert r.stdout.decode() == "%s/manhole/tcp-127.0.0.1:%d.secret\n" % (runtime, p.tcp_port)


# ---- Point 15: no secret file, no connection -------------------------------

def test_no_secret_file_says_so_at_once_and_never_connects(fakes, runtime):
    f = fakes(lambda c, fk: fk.stop.wait(), family=socket.AF_INET, addr=("127.0.0.1", 0))
    port = f.addr[1]
    r = run_cli("-c", "1", "127.0.0.1:%d" % port, env={"XDG_RUNTIME_DIR": str(runtime)})
    d = runtime / "manhole"
    assert r.returncode == 80
    assert r.stderr.decode() == (
        "manhole-cli: no secret file for 127.0.0.1:%d (looked in %s/tcp-127.0.0.1:%d.secret, "
        "%s/tcp-0.0.0.0:%d.secret); is the host listening there? give --secret-file\n"
        % (port, d, port, d, port))
    assert f.accepted == 0


def test_relative_xdg_runtime_dir_is_ignored_as_the_library_ignores_it(fakes, tmp_path):
    f = fakes(lambda c, fk: fk.stop.wait(), family=socket.AF_INET, addr=("127.0.0.1", 0))
    rel = tmp_path / "manhole"
    rel.mkdir()
    (rel / ("tcp-127.0.0.1:%d.secret" % f.addr[1])).write_bytes(SECRET + b"\n")
    r = subprocess.run(WRAP + [str(CLI), "-c", "1", "127.0.0.1:%d" % f.addr[1]], cwd=tmp_path,
                       env=dict(os.environ, XDG_RUNTIME_DIR="."), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=TIMEOUT)
    assert r.returncode == 80
    assert "(looked in /tmp/manhole-%d/tcp-127.0.0.1:%d.secret" % (os.geteuid(), f.addr[1]) \
        in r.stderr.decode()
    assert f.accepted == 0


# ---- Point 5: a script too long for one record is refused before sending ---

LIMIT = 1 << 20  # a manhole's default max_line: the most one E record may carry


def test_a_script_over_max_line_is_refused_before_sending(unix_fake):
    f = unix_fake(lambda c, fk: (greet(c, fk), fk.read_until(c, b"never")))
    body = "x = 1\n" * (LIMIT // 6 + 10)
    r = run_cli(f.addr, input=body.encode())  # (-c CODE: argv holds 128 KiB at most)
    err = one_line(r.stderr.decode())
    assert r.returncode == 2
    assert "too long to send in one piece" in err and "1 MiB" in err
    assert "exec(open(" in err
    assert f.accepted == 0


def test_a_long_script_never_runs_its_tail_on_the_demo(demo, tmp_path):
    marker = tmp_path / "tail-ran"
    script = "#" * 100 + "\n"
    script = script * (LIMIT // len(script) + 100) + "open(%r, 'w').close()\n" % str(marker)
    r = run_cli(demo.unix_path, input=script.encode())
    assert r.returncode == 2, r.stderr
    assert not marker.exists()
    r = run_cli("-c", "print('still here')", demo.unix_path)
    assert (r.returncode, r.stdout) == (0, b"still here\n")


def test_a_script_at_the_limit_runs(demo):
    tail = "print('ran')\n"
    room = LIMIT - len("<stdin>\n") - len(tail)
    script = ("#" * 99 + "\n") * (room // 100) + "#" * (room % 100 - 1) + "\n" + tail
    assert len("<stdin>\n") + len(script) == LIMIT
    r = run_cli(demo.unix_path, input=script.encode())
    assert (r.returncode, r.stdout) == (0, b"ran\n"), r.stderr


# ---- Point 8: bytes that are not UTF-8 never reach libedit, nor crash it ---

@pytest.fixture
def term(tmp_path):
    terms = []

    def make(*args, **kw):
        t = Term("--no-history", *args, state=tmp_path / "state", **kw)
        terms.append(t)
        return t

    yield make
    for t in terms:
        t.close()


def test_a_prompt_that_is_not_utf8_does_not_crash_the_client(demo, term):
    t = term(demo.unix_path)
    t.cmd("import sys")
    t.send("_ = sys.stdout.buffer.write(b'caf\\xe9: '); sys.stdout.flush(); x = input()\r")
    t.wait_cursor("caf\ufffd: ")
    t.send("yes\r")
    t.cmd("print(x)", "yes\n")
    t.ctrl_d()
    assert t.wait_exit() == 0


def thread_writes(t, first, then):
    """A thread that writes the bytes `first`, waits for go.set(), then
    writes `then` (both Python expressions); each write waits for go."""
    t.cmd("import sys, threading; go = threading.Event(); w = sys.stdout.buffer.write")
    t.cmd("a = %s; b = %s" % (first, then))
    t.block(["def f():", "    go.wait(); go.clear(); w(a); sys.stdout.flush()",
             "    go.wait(); w(b); sys.stdout.flush()"])
    t.cmd("t = threading.Thread(target=f)")


def test_a_character_split_across_two_writes_at_the_prompt_is_joined(demo, term):
    t = term(demo.unix_path)
    thread_writes(t, r"b'one \xc3'", r"b'\xa9 two\n'")
    t.send("go.set(); t.start()\r")
    t.wait(r">>> go\.set\(\); t\.start\(\)\n")
    t.wait_cursor("one >>> ")  # the lone first byte is held, not shown
    t.send("go.set()\r")
    t.wait(r"^\u00e9 two$")  # joined to the byte that came with it
    t.wait_cursor(">>> ")
    t.cmd("1 + 1", "2\n")
    assert "\ufffd" not in t.screen.text()


def test_a_long_partial_line_cut_inside_a_character_does_not_crash(demo, term):
    """3,000 three-byte characters without a line end while a line is
    edited: the client keeps the end of such a line as part of the prompt,
    cut on a character boundary. (The thread writes when Tab asks the
    namespace for trig's attributes, so the line is being edited.)"""
    t = term(demo.unix_path)
    thread_writes(t, r"'\u20ac'.encode() * 3000", r"b'\nend\n'")
    t.block(["class Trig:", "    def __dir__(self):", "        go.set()",
             "        return ['xyz']"])
    t.cmd("trig = Trig(); t.start()")
    t.send("trig.x\t")
    t.wait("\u20ac{20}>>> trig\\.xyz")
    t.send("\x15go.set()\r")  # Ctrl-U: the line emptied, then the rest of the output
    t.wait(r"^end$")
    t.wait_cursor(">>> ")
    t.cmd("1 + 1", "2\n")
    assert "\ufffd" not in t.screen.text()


def test_a_p_record_with_a_high_byte_is_shown_replaced(unix_fake, term):
    def talk(c, f):
        c.sendall(b"caf\xe9\x80: ")
        f.read_until(c, HELLO)
        c.sendall(HELLO + rec(b"P", b"1caf\xe9\x80: "))
        f.read_until(c, b"\n")
        c.sendall(b"out\xff\xff\xe2\x82" + rec(b"E", b"\xac err\n") + rec(b"S", b"0")
                  + rec(b"P", b"1\xff> "))
        f.drain(c)  # until the client leaves (Ctrl-D)

    t = term(unix_fake(talk).addr)
    t.wait_cursor("caf\ufffd\ufffd: ")
    t.send("1\r")
    # a 0xFF byte (IAC IAC) is no UTF-8; output and E records are two
    # streams: the E record's lone continuation byte is replaced, the
    # output's cut character waits for the rest of the output
    t.wait_cursor("\ufffd> ")
    assert "out\ufffd\ufffd err" in t.screen.text()
    t.ctrl_d()
    assert t.wait_exit() == 0


def test_completion_candidates_from_a_hostile_server_are_cleaned(unix_fake, term):
    def talk(c, f):
        greet(c, f)
        req = f.read_until(c, b"\xff\xf0")
        m = re.search(rb"\xff\xfa\x4dC(\d+) ab\xff\xf0", req)
        c.sendall(rec(b"C", m.group(1) + b" 2\nab\xe9c\nab\x1b[2Jc"))
        f.stop.wait()

    t = term(unix_fake(talk).addr)
    t.wait_cursor(">>> ")
    t.send("ab\t")
    t.wait_cursor(">>> ab\ufffdc")
    t.ctrl_c()
    t.wait_cursor(">>> ")


STTY_AROUND = "stty -a > %s; %s; echo status=$?; stty -a > %s"


def children(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGQUIT", "SIGSEGV", "SIGABRT"])
def test_the_terminal_is_restored_when_the_client_is_killed(demo, tmp_path, sig):
    before, after = tmp_path / "before", tmp_path / "after"
    cli = " ".join(shlex.quote(str(a)) for a in WRAP + [CLI, "--no-history", demo.unix_path])
    env = dict(os.environ, TERM="xterm", LC_ALL="C.UTF-8")
    p = pexpect.spawn("sh", ["-c", STTY_AROUND % (before, cli, after)], env=env,
                      dimensions=(24, 80))
    p.logfile_read = seen = io.BytesIO()
    try:
        p.expect_exact(">>> ", timeout=TIMEOUT)
        p.send("import time\r")
        p.expect_exact(">>> ", timeout=TIMEOUT)
        (client,) = children(p.pid)
        os.kill(client, getattr(signal, sig))
        p.expect(r"status=(\d+)", timeout=TIMEOUT)
        status = int(p.match.group(1))
        # (under a sanitizer, its own handler reports a SIGSEGV and aborts)
        assert status == 128 + getattr(signal, sig) or (SANITIZER and status == 128 + 6)
        p.expect(pexpect.EOF, timeout=TIMEOUT)
    finally:
        p.close(force=True)
    assert after.read_text() == before.read_text()
    shown = seen.getvalue()  # bracketed paste was turned off again
    assert shown.rfind(b"\x1b[?2004l") > shown.rfind(b"\x1b[?2004h") > 0


# ---- Point 10: what a server sends is bounded and checked -----------------

@measures_rss
def test_an_unterminated_record_is_bounded(unix_fake):
    f = unix_fake(lambda c, fk: (greet(c, fk),
                                 flood(c, b"\xff\xfa\x4dP1", b"x" * (1 << 20), 256 << 20)))
    code, out, err, rss = run_measured("-c", "1", f.addr)
    assert code == 85
    assert one_line(err) == ("manhole-cli: %s: the server broke the protocol: a record longer "
                             "than 16 MiB\n" % f.addr)
    assert rss < RSS_BOUND_MB, rss


@measures_rss
def test_a_huge_banner_is_bounded(unix_fake):
    f = unix_fake(lambda c, fk: flood(c, b"", b"banner " * 100000, 256 << 20))
    code, out, err, rss = run_measured("-c", "1", f.addr)
    assert code == 85
    assert one_line(err) == ("manhole-cli: %s: the server broke the protocol: more than 4 MiB "
                             "before the hello reply\n" % f.addr)
    assert rss < RSS_BOUND_MB, rss


@measures_rss
def test_a_long_stderr_record_streams_through_in_bounded_memory(unix_fake):
    size = 64 << 20

    def talk(c, f):
        greet(c, f)
        f.read_until(c, b"\xff\xf0")
        flood(c, b"\xff\xfa\x4dE", b"e" * (1 << 20), size)
        c.sendall(b"\xff\xf0" + rec(b"S", b"0") + rec(b"P", b"1>>> "))
        f.stop.wait()

    f = unix_fake(talk)
    code, out, err, rss = run_measured("-c", "1", f.addr)
    assert (code, out, len(err)) == (0, b"", size)
    assert rss < RSS_BOUND_MB, rss


@pytest.mark.parametrize("record, says", [
    (rec(b"X", b"99999999999999999999"), 'a malformed X record ("99999999999999999999")'),
    (rec(b"X", b""), 'a malformed X record ("")'),
    (rec(b"X", b"3x"), 'a malformed X record ("3x")'),
    (rec(b"S", b"2"), 'a malformed S record ("2")'),
    (rec(b"P", b"3>>> "), 'a malformed P record ("3>>> ")'),
    (rec(b"H", b"2"), 'a malformed H record ("2")'),
    (rec(b"W", b"\x1b[2J"), 'a malformed W record ("?[2J")'),
    (rec(b"C", b"-1 0"), 'a malformed C record ("-1 0")'),
    (rec(b"C", b"1 99999999999999999999\nx"), 'a malformed C record ("1 99999999999999999999?x")'),
])
def test_malformed_records_are_protocol_errors(unix_fake, record, says):
    def talk(c, f):
        greet(c, f)
        f.read_until(c, b"\xff\xf0")
        c.sendall(b"out\n" + record)
        f.stop.wait()

    f = unix_fake(talk)
    r = run_cli("-c", "1", f.addr)
    assert r.returncode == 85
    assert one_line(r.stderr.decode()) == (
        "manhole-cli: %s: the server broke the protocol: %s\n" % (f.addr, says))


def test_server_text_in_an_error_is_cleaned(unix_fake):
    f = unix_fake(lambda c, fk: c.sendall(b"manhole: too many clients \x1b[2J\xe9!\n"))
    r = run_cli("-c", "1", f.addr)
    assert r.returncode == 83
    assert r.stderr.decode() == ("manhole-cli: %s: the manhole refused this client: too many "
                                 "clients ?[2J\ufffd!\n" % f.addr)


@measures_rss
def test_a_flood_while_waiting_for_a_completion_is_bounded(unix_fake, term):
    flooded = threading.Event()

    def talk(c, f):
        greet(c, f)
        f.read_until(c, b"\xff\xfa\x4dC")
        flood(c, b"", rec(b"S", b"0") * 10000, 64 << 20)  # never answered
        flooded.set()
        f.read_until(c, b"\n")
        c.sendall(b"fine\n" + rec(b"S", b"0") + rec(b"P", b"1>>> "))
        f.drain(c)  # until the client leaves (Ctrl-D)

    t = term(unix_fake(talk).addr)
    t.wait_cursor(">>> ")
    t.send("ab\t")
    assert flooded.wait(TIMEOUT)
    t.send("\r")
    t.wait(r"^fine$")
    with open("/proc/%d/status" % t.p.pid) as st:
        hwm = int(re.search(r"VmHWM:\s+(\d+) kB", st.read()).group(1)) / 1024
    assert hwm < RSS_BOUND_MB, hwm
    t.ctrl_d()
    assert t.wait_exit() == 0
