"""Helpers for test_hardening.py: process facts read from /proc, a host
whose log is counted rather than kept, the LD_PRELOAD shims, and the
clean-up of processes a hostile statement leaves behind."""
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from conftest import TIMEOUT, Proc, Timeout

SHIMS = Path(__file__).resolve().parent / "shims"


# ---- /proc ------------------------------------------------------------------

def cpu_seconds(pid):
    """User + system CPU time of a process (all its threads), in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_time(pid):
    """The process's start time (clock ticks since boot): with the pid, it
    names one process even if the pid is reused later."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def socket_inodes(pid):
    """The inodes of the sockets a process holds open."""
    inodes = set()
    d = "/proc/%d/fd" % pid
    for fd in os.listdir(d):
        try:
            link = os.readlink(os.path.join(d, fd))
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]$", link)
        if m:
            inodes.add(int(m.group(1)))
    return inodes


def children(pid):
    """Direct children of a process (every thread's)."""
    kids = set()
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            try:
                with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                    kids.update(int(k) for k in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return kids


def descendants(pid):
    seen = set()
    todo = [pid]
    while todo:
        for k in children(todo.pop()):
            if k not in seen:
                seen.add(k)
                todo.append(k)
    return seen


def alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Reaper:
    """Processes a test's statements leave behind (forked children that
    ignore SIGTERM on the code under test, sleeps started by `timeout`):
    killed with SIGKILL, by pid, at teardown, before the hosts are
    stopped (else their pipes keep the harness waiting)."""

    def __init__(self):
        self.hosts = []
        self.pids = []

    def host(self, proc):
        self.hosts.append(proc.p.pid)
        return proc

    def pid(self, pid):
        self.pids.append((pid, start_time(pid)))
        return pid

    def reap(self):
        doomed = []
        for h in self.hosts:
            doomed += [(k, start_time(k)) for k in descendants(h)]
        doomed += self.pids
        for pid, started in doomed:
            if started is not None and start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# ---- Hosts -------------------------------------------------------------------

def has_option(binary, option):
    """Does this build of a host know a command-line option? (Options are
    stored as strings in the binary: test-host has no --help.)"""
    return option.lstrip("-").encode() in Path(binary).read_bytes()


def tcp_host_argv(host, demo):
    """A host binary and the flags for a TCP listener a plain client may
    use without the secret line (issue 8): test-host with --tcp-insecure
    where it has the flag, else the demo where it has it, else (a build
    from before issue 8, where TCP asks for no secret) test-host as it is."""
    for binary in (host, demo):
        if has_option(binary, "--tcp-insecure"):
            return [binary, "--port", "0", "--tcp-insecure"]
    return [host, "--port", "0"]


class CountingProc(Proc):
    """A host whose stderr is counted in lines but kept only up to a
    bound: a host that floods its log must not flood the test's memory."""

    KEEP = 1 << 20

    def __init__(self, *a, **kw):
        self.err_lines = 0
        self.err_bytes = 0
        super().__init__(*a, **kw)

    def _pump(self, f, sink):
        if sink is self._out:
            return super()._pump(f, sink)
        while True:
            chunk = f.read1(65536) if hasattr(f, "read1") else f.read(65536)
            with self._cv:
                if not chunk:
                    self._cv.notify_all()
                    return
                self.err_lines += chunk.count(b"\n")
                self.err_bytes += len(chunk)
                room = self.KEEP - len(sink)
                if room > 0:
                    sink.extend(chunk[:room])
                self._cv.notify_all()


def wait_started_or_exited(proc):
    """Wait until a host has printed its listening line or has exited;
    return True if it is listening."""
    try:
        proc.wait_for(r"listening on (unix|tcp):")
        return True
    except Timeout:
        if proc.p.poll() is None:
            raise
        return False


def wait_exit_or_listening(proc):
    """For a host expected to refuse its options: wait until it exits
    (True) or, wrongly, starts listening (False)."""
    return not wait_started_or_exited(proc)


# ---- Shims -------------------------------------------------------------------

_shim_lock = threading.Lock()


def shim(name, outdir):
    """Compile tests/shims/NAME.c into a shared object in outdir (once per
    directory) and return its path. Plain cc, no sanitizer: it is
    preloaded into hosts of any build."""
    src = SHIMS / (name + ".c")
    so = Path(outdir) / (name + ".so")
    with _shim_lock:
        if not so.exists():
            subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-Wall", "-o", str(so), str(src), "-ldl"],
                           check=True)
    return so


def preload_env(so):
    """Environment to preload a shim into a host (an ASan build insists on
    coming first in the library list; a plain shim is harmless there)."""
    env = {"LD_PRELOAD": str(so)}
    asan = os.environ.get("ASAN_OPTIONS", "")
    env["ASAN_OPTIONS"] = (asan + ":" if asan else "") + "verify_asan_link_order=0"
    return env


# ---- Sockets -----------------------------------------------------------------

def read_to_eof(sock, timeout=TIMEOUT, stop=None):
    """Read until the peer closes (returns (data, True)) or, if stop (bytes)
    is given, until it appears in the data (returns (data, False)). A reset
    counts as closed. Raises Timeout at the deadline."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        if stop is not None and stop in data:
            return data, False
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout("neither closed nor %r within %ss; received: %r"
                          % (stop, timeout, data[-2000:]))
        r, _, _ = select.select([sock], [], [], left)
        if not r:
            continue
        try:
            chunk = sock.recv(1 << 20)
        except (ConnectionResetError, ConnectionAbortedError):
            return data, True
        if not chunk:
            return data, True
        data += chunk


def send_all_or_closed(sock, data):
    """sendall() that reports, instead of raising, a peer that closed the
    connection under it (a dropped client). Returns True if all was sent."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
        return False


def unix_connect_refused(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(TIMEOUT)
    try:
        s.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    finally:
        s.close()
    return False
