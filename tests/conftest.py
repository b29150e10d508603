"""Shared harness: start real hosts, talk to them over real sockets.

Everything synchronises on what the server sends (prompts, log lines) with
a deadline; nothing sleeps to "give it time". MANHOLE_TEST_TIMEOUT (seconds,
default 20) scales every deadline for slow machines.
"""
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Variant builds (make check-asan, check-portable, ...) live in build/<name>.
BUILD = ROOT / os.environ.get("MANHOLE_BUILD_DIR", ".")
DEMO = BUILD / "demo" / "manhole-demo"
HOST = BUILD / "tests" / "hosts" / "test-host"
SANITIZER = bool(os.environ.get("MANHOLE_TEST_SANITIZER"))
# Flags for programs the tests compile themselves (the sanitizers' own).
TEST_CFLAGS = os.environ.get("MANHOLE_TEST_CFLAGS", "").split()
# The portable build (make check-portable) has no epoll, so no manhole_fd().
PORTABLE = bool(os.environ.get("MANHOLE_TEST_PORTABLE"))
needs_epoll = pytest.mark.skipif(PORTABLE, reason="manhole_fd() needs epoll; off in the portable build")
# What sanitizers and valgrind print when they find something.
REPORT = re.compile(r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|"
                    r"==\d+== (Invalid|Conditional|Use of|Syscall param|\d+ bytes in)|"
                    r"definitely lost")
TIMEOUT = float(os.environ.get("MANHOLE_TEST_TIMEOUT", "20"))
# Extra words put in front of every host command line (for example
# "valgrind -q --error-exitcode=99"), set by make check-valgrind.
WRAP = os.environ.get("MANHOLE_TEST_WRAP", "").split()

PS1 = b">>> "


def endpoint(host, port):
    """An address as wire.h writes it: 127.0.0.1:7000, [::1]:7000."""
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def default_secret_path(port, host="127.0.0.1", env=None):
    """Where the library writes the secret of a TCP listener by default
    (wire.h): DIR/tcp-ADDR:PORT.secret, DIR $XDG_RUNTIME_DIR/manhole if
    that is absolute, else /tmp/manhole-UID."""
    run = (os.environ if env is None else env).get("XDG_RUNTIME_DIR")
    base = Path(run) / "manhole" if run and run.startswith("/") else Path("/tmp/manhole-%d" % os.geteuid())
    return base / ("tcp-%s.secret" % endpoint(host, port))
PS2 = b"... "


class Timeout(AssertionError):
    pass


class Proc:
    """A host process; reads its stdout and stderr in the background."""

    def __init__(self, argv, env=None, preexec_fn=None, wait_listening=True, cwd=None,
                 close_fds=True):
        self.argv = [str(a) for a in argv]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.p = subprocess.Popen(
            WRAP + self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            preexec_fn=preexec_fn,
            cwd=cwd,
            close_fds=close_fds,
        )
        self._out = bytearray()
        self._err = bytearray()
        self._cv = threading.Condition()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.p.stdout, self._out), daemon=True),
            threading.Thread(target=self._pump, args=(self.p.stderr, self._err), daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.unix_path = None
        self.tcp_port = None
        if wait_listening:
            self.wait_listening()

    def _pump(self, f, sink):
        while True:
            chunk = f.read1(65536) if hasattr(f, "read1") else f.read(65536)
            with self._cv:
                if not chunk:
                    sink.extend(b"")
                    self._cv.notify_all()
                    return
                sink.extend(chunk)
                self._cv.notify_all()

    @property
    def out(self):
        with self._cv:
            return self._out.decode("utf-8", "replace")

    @property
    def err(self):
        with self._cv:
            return self._err.decode("utf-8", "replace")

    def wait_for(self, pattern, stream="out", timeout=TIMEOUT):
        """Wait until stdout (or stderr) matches a regex; return the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                text = (self._out if stream == "out" else self._err).decode("utf-8", "replace")
                m = rx.search(text)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(
                        "no %r in %s of %s within %ss\nstdout:\n%s\nstderr:\n%s"
                        % (pattern, stream, self.argv, timeout, self._out.decode(errors="replace"),
                           self._err.decode(errors="replace"))
                    )
                if self.p.poll() is not None and not any(t.is_alive() for t in self._readers):
                    raise Timeout("process exited (%s) without %r\nstdout:\n%s\nstderr:\n%s"
                                  % (self.p.returncode, pattern, self._out.decode(errors="replace"),
                                     self._err.decode(errors="replace")))
                self._cv.wait(min(left, 0.2))

    def wait_listening(self):
        m = self.wait_for(r"listening on (unix|tcp):(\S+)\n")
        text = self.out
        u = re.search(r"listening on unix:(\S+)\n", text)
        t = re.search(r"listening on tcp:(\S+):(\d+)\n", text)
        if u:
            self.unix_path = u.group(1)
        if t:
            self.tcp_port = int(t.group(2))
        return m

    def wait(self, timeout=TIMEOUT):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Timeout("%s did not exit within %ss\nstderr:\n%s" % (self.argv, timeout, self.err))

    def signal(self, sig):
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        for t in self._readers:
            t.join(TIMEOUT)
        return self.p.returncode

    def check_clean(self):
        """Fail if a sanitizer or valgrind reported anything."""
        m = REPORT.search(self.err)
        assert not m and self.p.returncode != 99, \
            "%s reported errors:\n%s" % (self.argv[0], self.err)

    def client(self, **kw):
        return Client.unix(self.unix_path, **kw)


class Client:
    """A socket client that reads until prompts, with deadlines."""

    def __init__(self, sock, greet=True, prompt=PS1):
        self.sock = sock
        self.buf = bytearray()
        self.seen = bytearray()  # everything received, for messages
        self.eof = False
        self.greeting = b""
        if greet:
            self.greeting = self.read_until(prompt)

    @classmethod
    def unix(cls, path, **kw):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect(path)
        return cls(s, **kw)

    @classmethod
    def tcp(cls, port, host="127.0.0.1", secret="auto", **kw):
        """A TCP client; it sends the secret first (by default the one the
        library wrote for that port, if there is one: README, Security)."""
        s = socket.create_connection((host, port), timeout=TIMEOUT)
        if secret == "auto":
            path = default_secret_path(port, host)
            secret = path.read_text().strip() if path.exists() else None
        if secret:
            s.sendall(secret.encode() + b"\n")
        return cls(s, **kw)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout("timed out; received so far: %r" % bytes(self.seen[-2000:]))
        r, _, _ = select.select([self.sock], [], [], left)
        if not r:
            raise Timeout("timed out; received so far: %r" % bytes(self.seen[-2000:]))
        try:
            chunk = self.sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf.extend(chunk)
        self.seen.extend(chunk)
        return True

    def read_until(self, token, timeout=TIMEOUT):
        """Return everything up to and including token."""
        if isinstance(token, str):
            token = token.encode()
        deadline = time.monotonic() + timeout
        while True:
            i = self.buf.find(token)
            if i >= 0:
                out = bytes(self.buf[: i + len(token)])
                del self.buf[: i + len(token)]
                return out
            if self.eof or not self._fill(deadline):
                raise Timeout("connection closed before %r; received: %r" % (token, bytes(self.seen[-2000:])))

    def read_all(self, timeout=TIMEOUT):
        """Read until the server closes the connection."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            self._fill(deadline)
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def cmd(self, line, prompt=PS1, timeout=TIMEOUT):
        """Send one line; return its output (str) without the next prompt."""
        self.send(line + "\n")
        out = self.read_until(prompt, timeout)
        return out[: -len(prompt)].decode("utf-8", "replace")

    def block(self, lines, timeout=TIMEOUT):
        """Send a multi-line block and the empty line that ends it."""
        text = "\n".join(lines) + "\n\n"
        self.send(text)
        out = b""
        for _ in range(len(lines)):
            out += self.read_until(PS2, timeout)
        out += self.read_until(PS1, timeout)
        return out[: -len(PS1)].decode("utf-8", "replace")

    def shutdown_write(self):
        self.sock.shutdown(socket.SHUT_WR)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def interactive_console(text):
    """What `python3 -i` prints for this input (the oracle): the same
    CPython's own interactive loop fed the same lines, as tests/parity_util
    drives it (MANHOLE_ORACLE_PYTHON), with only what a terminal needs at
    end of input left out."""
    from parity_util import eof_normalise, python_i
    return eof_normalise(python_i(text, tempfile.gettempdir()))


@pytest.fixture
def sockdir():
    # Short paths: sun_path holds 108 bytes.
    d = tempfile.mkdtemp(prefix="mh", dir="/tmp")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start(sockdir):
    """start(binary, *args) -> Proc, with --path in a fresh directory unless
    given; every process is stopped at teardown."""
    procs = []

    def _start(binary=DEMO, *args, path=True, **kw):
        argv = [binary]
        args = list(args)
        if path and "--path" not in args:
            argv += ["--path", str(sockdir / "s")]
        argv += args
        p = Proc(argv, **kw)
        procs.append(p)
        return p

    yield _start
    for p in procs:
        p.stop()
    for p in procs:
        p.check_clean()


@pytest.fixture
def demo(start):
    """The demo with its defaults (threaded, shared, 5 s), on a temp path."""
    return start(DEMO)


def wait_true(fn, timeout=TIMEOUT, what="condition"):
    """Poll a cheap check (each call is a round trip, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
    raise Timeout("%s never became true" % what)
