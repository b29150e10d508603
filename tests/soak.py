#!/usr/bin/env python3
"""Soak test (make soak): many clients, mixed good and bad input, for a
bounded time; descriptors, threads and RSS of the host are sampled before
and after, and must not grow.

    python3 tests/soak.py --seconds 60 --clients 32

Each client thread loops over random actions and checks every reply:
statements, syntax errors, invalid UTF-8, over-long lines, timeouts,
half-closed scripts, one-byte-at-a-time input, output floods abandoned
unread, connections reset mid-statement. Before measuring, the host is
warmed up with the same load and left idle until its worker pool has
shrunk back (idle workers leave after 30 s), and again after the soak.
"""
import argparse
import os
import random
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import HOST, PS1, PS2, Client, Proc  # noqa: E402


def stats(pid):
    fds = len(os.listdir("/proc/%d/fd" % pid))
    status = open("/proc/%d/status" % pid).read()
    threads = int(status.split("Threads:")[1].split()[0])
    rss = int(status.split("VmRSS:")[1].split()[0])
    return fds, threads, rss


class Load:
    def __init__(self, path, seed):
        self.path = path
        self.rng = random.Random(seed)
        self.ok = 0
        self.errors = []

    def check(self, cond, what):
        if cond:
            self.ok += 1
        else:
            self.errors.append(what)

    def action(self):
        r = self.rng.random()
        if r < 0.35:
            c = Client.unix(self.path)
            for _ in range(self.rng.randint(1, 20)):
                a, b = self.rng.randint(0, 999), self.rng.randint(0, 999)
                out = c.cmd("print(%d + %d)" % (a, b))
                self.check(out == "%d\n" % (a + b), "arith %r" % out)
            c.close()
        elif r < 0.45:
            c = Client.unix(self.path)
            self.check("SyntaxError" in c.cmd("x = = 1"), "syntax error")
            c.send(b"y = '\xc3\x28'\n")
            self.check(c.read_until(PS1).startswith(b"manhole: line discarded"), "bad utf-8")
            c.send(b"z = '" + b"q" * 10000 + b"'\n")
            self.check(c.read_until(PS1).startswith(b"manhole: line too long"), "long line")
            self.check(c.cmd("'fine'") == "'fine'\n", "after bad input")
            c.close()
        elif r < 0.55:
            c = Client.unix(self.path)
            c.send("while True:\n    n = 1\n\n")
            c.read_until(PS2)
            c.read_until(PS2)
            self.check(c.read_until(PS1).startswith(b"TimeoutError"), "timeout")
            c.close()
        elif r < 0.65:
            c = Client.unix(self.path)
            c.send("for i in range(3):\n    print(i)\n\nprint('end')\n")
            c.shutdown_write()
            out = c.read_all()
            self.check(out.endswith(b"0\n1\n2\n>>> end\n>>> "), "half-close %r" % out[-40:])
            c.close()
        elif r < 0.72:
            c = Client.unix(self.path)
            for b in b"print('slow')\n":
                c.send(bytes([b]))
            self.check(c.read_until(PS1) == b"slow\n>>> ", "byte at a time")
            c.close()
        elif r < 0.82:
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.path)
            s.sendall(b"for i in range(20000): print('f' * 100)\n\n")
            s.recv(10)
            s.close()  # output flood left unread
            self.ok += 1
        elif r < 0.92:
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.path)
            s.sendall(b"import time\ntime.sleep(0.05); print(1)\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # reset mid-statement
            self.ok += 1
        else:
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.path)
            s.sendall(bytes(self.rng.getrandbits(8) for _ in range(2000)) + b"\n")
            s.close()  # garbage, then gone
            self.ok += 1

    def run(self, until):
        while time.monotonic() < until:
            try:
                self.action()
            except Exception as e:  # a failed round trip is an error
                self.errors.append(repr(e))


def drive(path, clients, seconds, seed):
    until = time.monotonic() + seconds
    loads = [Load(path, seed + i) for i in range(clients)]
    threads = [threading.Thread(target=l.run, args=(until,)) for l in loads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(l.ok for l in loads), [e for l in loads for e in l.errors]


def settle(pid, threads_at_most=None, idle=35, limit=90):
    """Let the worker pool shrink back (idle workers leave after 30 s):
    wait `idle` seconds, or until the thread count is back to a baseline."""
    start = time.monotonic()
    while True:
        s = stats(pid)
        waited = time.monotonic() - start
        if threads_at_most is not None and s[1] <= threads_at_most:
            return s
        if (threads_at_most is None and waited >= idle) or waited >= limit:
            return s
        time.sleep(1)  # idle time is what is being measured here


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    d = "/tmp/mhsoak%d" % os.getpid()
    os.makedirs(d, exist_ok=True)
    path = d + "/s"
    p = Proc([HOST, "--path", path, "--timeout", "0.5", "--max-output", "65536",
              "--max-line", "4096", "--max-clients", "256"])
    try:
        print("warming up (%d clients, 5 s)..." % args.clients, flush=True)
        drive(path, args.clients, 5, args.seed + 1000)
        before = settle(p.p.pid)
        print("before: fds %d, threads %d, rss %d KiB" % before, flush=True)
        print("soaking (%d clients, %g s)..." % (args.clients, args.seconds), flush=True)
        ok, errors = drive(path, args.clients, args.seconds, args.seed)
        after = settle(p.p.pid, threads_at_most=before[1])
        print("after:  fds %d, threads %d, rss %d KiB" % after, flush=True)
        print("%d checks passed, %d errors" % (ok, len(errors)), flush=True)
        for e in errors[:20]:
            print("  error:", e)
        alive = p.p.poll() is None
        grew = (after[0] > before[0] or after[1] > before[1]
                or after[2] > before[2] * 1.10 + 4096)
        if errors or grew or not alive:
            print("SOAK FAILED%s" % ("" if alive else ": host died"))
            return 1
        print("soak passed")
        return 0
    finally:
        p.stop()
        import shutil
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
