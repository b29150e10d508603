"""Helpers for the manhole-cli tests: run the client, drive it through a
real pseudo-terminal (pexpect), and read the screen a person would see
through a small terminal emulator (enough of xterm for what libedit and the
client send). Everything waits on what appears, with deadlines."""
import codecs
import os
import re
import subprocess
import sys
import time
import unicodedata

import pexpect

from conftest import BUILD, REPORT, TIMEOUT, WRAP, Timeout

CLI = BUILD / "cli" / "manhole-cli"


def run_cli(*args, input=None, env=None, timeout=TIMEOUT, user=None):
    """Run the client without a terminal; returns CompletedProcess (bytes)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    kw = {}
    if user is not None:
        kw["preexec_fn"] = lambda: (os.setgid(user), os.setuid(user))
    r = subprocess.run(WRAP + [str(CLI)] + [str(a) for a in args], input=input,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
                       timeout=timeout, **kw)
    err = r.stderr.decode(errors="replace")
    assert not REPORT.search(err), "sanitizer report:\n" + err
    return r


class Screen:
    """A terminal screen: printable text, CR/LF/BS/TAB, CSI cursor moves,
    erase and insert/delete, insert mode, auto-wrap with xterm's pending
    wrap; lines scrolled off the top are kept in scrollback."""

    def __init__(self, rows=24, cols=80):
        self.rows, self.cols = rows, cols
        self.grid = [[" "] * cols for _ in range(rows)]
        self.scrollback = []
        self.row = self.col = 0
        self.wrap_pending = False
        self.insert_mode = False
        self.saved = (0, 0)
        self.dec = codecs.getincrementaldecoder("utf-8")("replace")
        self.esc = None  # pending escape sequence text

    # -- helpers
    def _linefeed(self):
        if self.row == self.rows - 1:
            self.scrollback.append("".join(self.grid[0]).rstrip())
            del self.grid[0]
            self.grid.append([" "] * self.cols)
        else:
            self.row += 1

    def _put(self, ch):
        w = 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
        if unicodedata.combining(ch):
            return
        if self.wrap_pending or self.col + w > self.cols:
            self.col = 0
            self._linefeed()
            self.wrap_pending = False
        line = self.grid[self.row]
        if self.insert_mode:
            line.insert(self.col, ch)
            del line[self.cols:]
        else:
            line[self.col] = ch
        if w == 2 and self.col + 1 < self.cols:
            line[self.col + 1] = ""
        if self.col + w >= self.cols:
            self.col = self.cols - 1
            self.wrap_pending = True
        else:
            self.col += w

    def _csi(self, params, final):
        priv = params.startswith("?")
        nums = [int(p) if p.isdigit() else 0 for p in params.lstrip("?").split(";")] if params.lstrip("?") else []
        n = nums[0] if nums and nums[0] else 1
        line = self.grid[self.row]
        self.wrap_pending = False
        if final == "A":
            self.row = max(0, self.row - n)
        elif final == "B":
            self.row = min(self.rows - 1, self.row + n)
        elif final == "C":
            self.col = min(self.cols - 1, self.col + n)
        elif final == "D":
            self.col = max(0, self.col - n)
        elif final == "G":
            self.col = min(self.cols - 1, n - 1)
        elif final == "d":
            self.row = min(self.rows - 1, n - 1)
        elif final in "Hf":
            r = nums[0] if len(nums) > 0 and nums[0] else 1
            c = nums[1] if len(nums) > 1 and nums[1] else 1
            self.row, self.col = min(self.rows, r) - 1, min(self.cols, c) - 1
        elif final == "J":
            mode = nums[0] if nums else 0
            if mode == 0:
                line[self.col:] = [" "] * (self.cols - self.col)
                for r in range(self.row + 1, self.rows):
                    self.grid[r] = [" "] * self.cols
            elif mode == 1:
                line[:self.col + 1] = [" "] * (self.col + 1)
                for r in range(0, self.row):
                    self.grid[r] = [" "] * self.cols
            else:
                self.grid = [[" "] * self.cols for _ in range(self.rows)]
        elif final == "K":
            mode = nums[0] if nums else 0
            if mode == 0:
                line[self.col:] = [" "] * (self.cols - self.col)
            elif mode == 1:
                line[:self.col + 1] = [" "] * (self.col + 1)
            else:
                self.grid[self.row] = [" "] * self.cols
        elif final == "P":
            del line[self.col:self.col + n]
            line.extend([" "] * (self.cols - len(line)))
        elif final == "@":
            for _ in range(n):
                line.insert(self.col, " ")
            del line[self.cols:]
        elif final == "X":
            line[self.col:self.col + n] = [" "] * len(line[self.col:self.col + n])
        elif final in "hl" and not priv and 4 in nums:
            self.insert_mode = final == "h"

    def feed(self, data):
        for ch in self.dec.decode(data):
            if self.esc is not None:
                self.esc += ch
                e = self.esc
                if len(e) == 1:
                    if ch == "[" or ch in "()#%]":
                        continue
                    if ch == "7":
                        self.saved = (self.row, self.col)
                    elif ch == "8":
                        self.row, self.col = self.saved
                    elif ch == "M":
                        self.row = max(0, self.row - 1)
                    self.esc = None
                elif e[0] == "[":
                    if "\x40" <= ch <= "\x7e":
                        self._csi(e[1:-1], ch)
                        self.esc = None
                elif e[0] == "]":
                    if ch == "\a" or e.endswith("\x1b\\"):
                        self.esc = None
                else:
                    self.esc = None  # ESC ( B and friends: one more character
                continue
            if ch == "\x1b":
                self.esc = ""
            elif ch == "\r":
                self.col = 0
                self.wrap_pending = False
            elif ch == "\n":
                self._linefeed()
                self.wrap_pending = False
            elif ch == "\b":
                if self.wrap_pending:
                    self.wrap_pending = False
                else:
                    self.col = max(0, self.col - 1)
            elif ch == "\t":
                self.col = min(self.cols - 1, (self.col // 8 + 1) * 8)
            elif ch < " " or ch == "\x7f":
                continue
            else:
                self._put(ch)

    def lines(self):
        return ["".join(r).rstrip() for r in self.grid]

    def text(self):
        """Scrollback and screen, without the blank lines at the bottom."""
        out = self.scrollback + self.lines()
        while out and not out[-1]:
            out.pop()
        return "\n".join(out)

    def cursor_line(self):
        return "".join(self.grid[self.row])[: self.col]


class Term:
    """manhole-cli on a pseudo-terminal, and the screen it draws."""

    UP, DOWN, LEFT, RIGHT = "\x1b[A", "\x1b[B", "\x1b[D", "\x1b[C"

    def __init__(self, *args, state=None, env=None, rows=24, cols=80, term="xterm"):
        full_env = dict(os.environ)
        full_env.update({"TERM": term, "LC_ALL": "C.UTF-8"})
        if state is not None:
            full_env["XDG_STATE_HOME"] = str(state)
        full_env.update(env or {})
        argv = WRAP + [str(CLI)] + [str(a) for a in args]
        self.p = pexpect.spawn(argv[0], argv[1:], env=full_env, dimensions=(rows, cols))
        self.screen = Screen(rows, cols)
        self.raw = bytearray()
        self.exited = False

    def _pump(self, timeout):
        try:
            data = self.p.read_nonblocking(65536, timeout)
        except pexpect.TIMEOUT:
            return False
        except pexpect.EOF:
            self.exited = True
            return False
        self.raw.extend(data)
        self.screen.feed(data)
        return True

    def wait(self, pattern, timeout=TIMEOUT, what=None):
        """Wait until the screen text (scrollback included) matches the
        regex (re.S | re.M); returns the match."""
        rx = re.compile(pattern, re.S | re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.screen.text())
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0 or (self.exited and not self._pump(0)):
                raise Timeout("screen never matched %r%s\n--- screen ---\n%s\n--- raw tail ---\n%r"
                              % (pattern, " (client exited)" if self.exited else "",
                                 self.screen.text(), bytes(self.raw[-1500:])))
            self._pump(min(left, 0.2))

    def wait_cursor(self, text, timeout=TIMEOUT):
        """Wait until the line up to the cursor is exactly text."""
        deadline = time.monotonic() + timeout
        while self.screen.cursor_line() != text:
            if time.monotonic() > deadline or self.exited:
                raise Timeout("cursor line is %r, not %r\n--- screen ---\n%s\n--- raw tail ---\n%r"
                              % (self.screen.cursor_line(), text, self.screen.text(),
                                 bytes(self.raw[-1500:])))
            self._pump(0.2)

    def tail_is(self, text, timeout=TIMEOUT):
        """Wait until the screen ends with these lines and the cursor is at
        the end of the last one."""
        want = text.rstrip("\n")
        last = want.split("\n")[-1]
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen.text()
            if (shown.endswith(want.rstrip()) and self.screen.cursor_line() == last):
                return
            if time.monotonic() > deadline or (self.exited and not self._pump(0)):
                raise Timeout("screen does not end with %r (cursor line %r)\n--- screen ---\n%s"
                              "\n--- raw tail ---\n%r" % (want, self.screen.cursor_line(), shown,
                                                          bytes(self.raw[-1500:])))
            self._pump(0.2)

    def send(self, s):
        self.p.send(s.encode() if isinstance(s, str) else s)

    def cmd(self, s, output=None, prompt=">>> "):
        """At a fresh prompt: type s and Enter, wait for the next prompt;
        return (and check, if given) the output between them."""
        self.wait_cursor(prompt)
        echo = "\n" + prompt + s + "\n"
        before = ("\n" + self.screen.text()).count(echo)
        self.send(s + "\r")
        end = prompt.rstrip()
        deadline = time.monotonic() + TIMEOUT
        while True:
            text = "\n" + self.screen.text()
            if text.count(echo) > before and self.screen.cursor_line() == prompt:
                rest = text[text.rfind(echo) + len(echo):]
                if rest == end or rest.endswith("\n" + end):
                    got = rest[:-len(end)]
                    if output is not None:
                        assert got == output, "output %r, expected %r\n--- screen ---\n%s" % (
                            got, output, self.screen.text())
                    return got
            if time.monotonic() > deadline or (self.exited and not self._pump(0)):
                raise Timeout("no output and prompt after %r\n--- screen ---\n%s\n--- raw tail ---\n%r"
                              % (s, self.screen.text(), bytes(self.raw[-1500:])))
            self._pump(0.2)

    def block(self, lines):
        """Type a block line by line, each at its prompt, and the empty
        line that ends it; wait for the next >>> prompt."""
        self.wait_cursor(">>> ")
        for line in lines:
            self.send(line + "\r")
            self.wait_cursor("... ")
        self.send("\r")
        self.wait(re.escape("... " + lines[-1].rstrip()) + r"\n\.\.\.\n(.*\n)?>>>\Z")

    def ctrl_c(self):
        self.p.sendintr()

    def ctrl_d(self):
        self.send("\x04")

    def wait_exit(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while not self.exited:
            if time.monotonic() > deadline:
                raise Timeout("client did not exit\n%s" % self.screen.text())
            self._pump(0.2)
        self.p.close()
        status = self.p.exitstatus if self.p.exitstatus is not None else 128 + self.p.signalstatus
        assert not REPORT.search(self.raw.decode(errors="replace")), self.raw.decode(errors="replace")
        return status

    def close(self):
        if not self.exited:
            self.p.terminate(force=True)
        self.p.close(force=True)


FAKE_SERVER = r"""
import os, socket, sys, threading
# Answers the manhole hello on each path given (a stand-in for a process
# with several manholes), or (--silent) listens and never answers.
silent = sys.argv[1] == "--silent"
paths = sys.argv[2:] if silent else sys.argv[1:]
def serve(ls):
    while True:
        c, _ = ls.accept()
        if silent:
            continue
        def talk(c=c):
            c.sendall(b">>> ")
            data = b""
            while b"\xff\xfa\x4dH1\xff\xf0" not in data:
                d = c.recv(100)
                if not d:
                    return
                data += d
            c.sendall(b"\xff\xfa\x4dH1\xff\xf0\xff\xfa\x4dP1>>> \xff\xf0")
            while c.recv(100):
                pass
        threading.Thread(target=talk, daemon=True).start()
for p in paths:
    s = socket.socket(socket.AF_UNIX)
    s.bind(p)
    s.listen(8)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("listening on unix:" + paths[0], flush=True)
threading.Event().wait()
"""


def fake_server_argv(*args):
    return [sys.executable, "-c", FAKE_SERVER] + [str(a) for a in args]
