"""A small client for the manhole's extended channel (issue 8), and oracles.

The extended channel (README, Protocol) is telnet subnegotiation with the
private option 77 ('M'):

    IAC SB 77 <type> <payload> IAC SE

with every 0xFF byte of the payload doubled. In extended mode the server's
output between records has its 0xFF bytes doubled too. ExtClient splits the
byte stream into output (un-doubled) and records, and keeps every event in
order, so a test can check what came before what.

Everything waits on what the server sends, with a deadline (conftest's
TIMEOUT); nothing sleeps.
"""
import os
import select
import socket
import subprocess
import sys
import termios
import time

from conftest import TIMEOUT, Timeout

IAC, SB, SE = 0xFF, 0xFA, 0xF0
IP, BRK = 0xF4, 0xF3
OPT = 77  # 'M'

IAC_IP = bytes([IAC, IP])
IAC_BRK = bytes([IAC, BRK])


def escape_iac(data):
    """Double every 0xFF byte, as telnet wants inside SB and in the data."""
    return data.replace(b"\xff", b"\xff\xff")


def record(kind, payload=b""):
    """One extended record: IAC SB 77 <kind> <payload> IAC SE."""
    if isinstance(kind, str):
        kind = kind.encode()
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return bytes([IAC, SB, OPT]) + kind + escape_iac(payload) + bytes([IAC, SE])


HELLO = record("H", "1")
INTERRUPT = record("I")


def complete_request(rid, text):
    return record("C", "%d %s" % (rid, text))


def run_request(filename, source):
    return record("E", filename + "\n" + source)


class Record:
    """A record from the server: kind ('P', 'S', ...) and raw payload."""

    def __init__(self, kind, payload):
        self.kind = kind
        self.payload = payload

    @property
    def text(self):
        return self.payload.decode("utf-8")

    def __repr__(self):
        return "Record(%r, %r)" % (self.kind, self.payload)

    def __eq__(self, other):
        return isinstance(other, Record) and (self.kind, self.payload) == (other.kind, other.payload)

    # Completion replies: "C<id> <n>\n<cand>\n<cand>..."
    def completion(self):
        """(id, n, [candidates]) of a C record."""
        assert self.kind == "C", self
        head, _, rest = self.text.partition("\n")
        rid, n = head.split(" ")
        cands = rest.split("\n") if rest else []
        if cands and cands[-1] == "":
            cands.pop()  # a trailing newline after the last candidate
        return int(rid), int(n), cands


class Parser:
    """Incremental parser of the server's bytes in extended mode."""

    def __init__(self):
        self.pending = bytearray()
        self.events = []  # bytes (output) or Record, in order
        self.err = bytearray()  # the payloads of E records (stderr), in order

    def _out(self, data):
        if not data:
            return
        if self.events and isinstance(self.events[-1], bytearray):
            self.events[-1].extend(data)
        else:
            self.events.append(bytearray(data))

    def feed(self, data):
        self.pending.extend(data)
        buf = self.pending
        i = 0
        out = bytearray()
        while i < len(buf):
            b = buf[i]
            if b != IAC:
                j = buf.find(b"\xff", i)
                if j < 0:
                    j = len(buf)
                out.extend(buf[i:j])
                i = j
                continue
            if i + 1 >= len(buf):
                break  # need more
            cmd = buf[i + 1]
            if cmd == IAC:
                out.append(IAC)
                i += 2
                continue
            if cmd == SB:
                # find the closing IAC SE, skipping doubled IACs
                k = i + 2
                payload = bytearray()
                done = False
                while k < len(buf):
                    if buf[k] == IAC:
                        if k + 1 >= len(buf):
                            break
                        if buf[k + 1] == IAC:
                            payload.append(IAC)
                            k += 2
                            continue
                        if buf[k + 1] == SE:
                            done = True
                            k += 2
                            break
                        raise AssertionError("IAC %d inside a subnegotiation: %r"
                                             % (buf[k + 1], bytes(buf[i:k + 2])))
                    payload.append(buf[k])
                    k += 1
                if not done:
                    break  # need more
                assert payload[:1] == bytes([OPT]), "subnegotiation of option %r" % payload[:1]
                if chr(payload[1]) == "E":
                    # stderr: output as a plain client sees it, in order;
                    # kept apart too, so tests can tell the streams apart
                    out.extend(payload[2:])
                    self.err.extend(payload[2:])
                    i = k
                    continue
                self._out(out)
                out = bytearray()
                self.events.append(Record(chr(payload[1]), bytes(payload[2:])))
                i = k
                continue
            raise AssertionError("unexpected telnet command IAC %d from the server: %r"
                                 % (cmd, bytes(buf[max(0, i - 40):i + 40])))
        self._out(out)
        del buf[:i]


class ExtClient:
    """A client that asked for the extension (or will: hello=False)."""

    def __init__(self, sock, hello=True, first_line=None):
        self.sock = sock
        self.parser = Parser()
        self.raw = bytearray()  # every byte received, as received
        self.eof = False
        self.banner = b""
        if first_line is not None:
            self.send(first_line + b"\n")
        if hello:
            self.hello()

    @classmethod
    def unix(cls, path, **kw):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect(path)
        return cls(s, **kw)

    @classmethod
    def tcp(cls, port, secret=None, **kw):
        s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        return cls(s, first_line=secret.encode() if secret is not None else None, **kw)

    # ---- bytes in and out

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.sock.sendall(data)

    def line(self, text):
        self.send(text + "\n")

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.sock], [], [], left)[0]:
            raise Timeout("timed out; events so far: %r" % self.parser.events[-20:])
        try:
            chunk = self.sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.raw.extend(chunk)
        self.parser.feed(chunk)
        return True

    def next_event(self, timeout=TIMEOUT):
        """The next event: bytes (output) or a Record; None at EOF."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.parser.events
            # output is handed out only once a record (or EOF) follows it,
            # so that one write split over two recv()s stays one event
            if ev and (not isinstance(ev[0], bytearray) or len(ev) > 1 or self.eof):
                e = ev.pop(0)
                return bytes(e) if isinstance(e, bytearray) else e
            if self.eof:
                return None
            self._fill(deadline)

    def until(self, kinds, timeout=TIMEOUT):
        """Read events until a record of one of kinds.

        Returns (output bytes, records before it, the record)."""
        out = bytearray()
        recs = []
        deadline = time.monotonic() + timeout
        while True:
            e = self.next_event(max(0.0, deadline - time.monotonic()))
            if e is None:
                raise Timeout("closed before a record of %r; output %r, records %r"
                              % (kinds, bytes(out), recs))
            if isinstance(e, bytes):
                out.extend(e)
            elif e.kind in kinds:
                return bytes(out), recs, e
            else:
                recs.append(e)

    def until_output(self, token, timeout=TIMEOUT):
        """Read events until output contains token; returns (output, records)."""
        if isinstance(token, str):
            token = token.encode()
        out = bytearray()
        recs = []
        deadline = time.monotonic() + timeout
        while token not in out:
            # output handed out as it arrives here
            ev = self.parser.events
            if ev:
                e = ev.pop(0)
                if isinstance(e, bytearray):
                    out.extend(e)
                else:
                    recs.append(e)
                continue
            if self.eof or not self._fill(deadline):
                raise Timeout("closed before %r; output %r" % (token, bytes(out)))
        return bytes(out), recs

    def read_to_eof(self, timeout=TIMEOUT):
        """Every event until the server closes: (output, records)."""
        out = bytearray()
        recs = []
        deadline = time.monotonic() + timeout
        while True:
            e = self.next_event(max(0.0, deadline - time.monotonic()))
            if e is None:
                return bytes(out), recs
            if isinstance(e, bytes):
                out.extend(e)
            else:
                recs.append(e)

    # ---- the protocol

    def hello(self):
        """Send hello; return the banner (raw bytes before the H reply,
        without the prompt the P record repeats)."""
        self.send(HELLO)
        out, recs, h = self.until("H")
        assert h.payload == b"1", h
        assert recs == [], recs
        out2, recs2, p = self.until("P")
        assert (out2, recs2) == (b"", []), (out2, recs2)
        assert p.payload[:1] == b"1", p
        prompt = p.payload[1:]
        assert out.endswith(prompt), (out, prompt)
        self.banner = out[: len(out) - len(prompt)]
        self.prompt = p
        return self.banner

    def statement(self, line, timeout=TIMEOUT):
        """Send one line; wait for the next P record.

        Returns (output str, status or None, prompt record): status is
        the S record's payload ("0"/"1") or None when no S came."""
        self.line(line)
        return self.wait_prompt(timeout)

    def wait_prompt(self, timeout=TIMEOUT):
        out, recs, p = self.until("P", timeout)
        s = [r for r in recs if r.kind == "S"]
        other = [r for r in recs if r.kind != "S"]
        assert len(s) <= 1 and not other, recs
        return out.decode("utf-8", "replace"), (s[0].text if s else None), p

    def complete(self, text, rid=1, timeout=TIMEOUT):
        """Ask for completions; return (n, candidates) and any output seen
        meanwhile is kept for the next reads."""
        self.send(complete_request(rid, text))
        return self.completion_reply(rid, timeout)

    def completion_reply(self, rid, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        held = []
        try:
            while True:
                e = self.next_event(max(0.0, deadline - time.monotonic()))
                if e is None:
                    raise Timeout("closed before completion reply %d" % rid)
                if isinstance(e, Record) and e.kind == "C":
                    got, n, cands = e.completion()
                    if got == rid:
                        return n, cands
                held.append(e)
        finally:
            # put back what was not ours, in order
            self.parser.events[0:0] = [bytearray(e) if isinstance(e, bytes) else e for e in held]

    def interrupt(self):
        self.send(INTERRUPT)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def read_until_any(client, tokens, timeout=TIMEOUT):
    """conftest.Client: read until one of tokens; returns (bytes, token)."""
    deadline = time.monotonic() + timeout
    while True:
        best = None
        for t in tokens:
            i = client.buf.find(t)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, t)
        if best:
            i, t = best
            out = bytes(client.buf[: i + len(t)])
            del client.buf[: i + len(t)]
            return out, t
        if client.eof or not client._fill(deadline):
            raise Timeout("closed before any of %r; received %r" % (tokens, bytes(client.seen[-2000:])))


def read_until_all(client, tokens, timeout=TIMEOUT):
    """conftest.Client: read until every token was received (in any order)
    since this call; returns the bytes read."""
    deadline = time.monotonic() + timeout
    got = bytearray(client.buf)
    client.buf.clear()
    while not all(t in got for t in tokens):
        if client.eof or not client._fill(deadline):
            raise Timeout("closed before all of %r; received %r" % (tokens, bytes(got)))
        got.extend(client.buf)
        client.buf.clear()
    return bytes(got)


def python_i(text, timeout=TIMEOUT):
    """What `python3 -i` prints for this input, typed at a terminal.

    The interpreter runs on a pseudo-terminal with echo and output
    post-processing off (so the transcript holds only what Python wrote,
    with plain newlines), without the readline module (which would redraw
    lines itself), stdout and stderr merged. Input is queued at once: a
    terminal hands it out one line per read, so the REPL, input() and pdb
    each get exactly their line. The transcript starts with the first
    ">>> " and ends with the prompt after the last line."""
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    # The same CPython as the embedded one (MANHOLE_ORACLE_PYTHON, set by
    # make check-pythons; else the one running pytest); -S keeps site (and
    # readline) out; 3.13+ on its basic REPL, the interactive loop.
    python = os.environ.get("MANHOLE_ORACLE_PYTHON") or sys.executable
    p = subprocess.Popen([python, "-S", "-q", "-i", "-c",
                          "import sys; sys.modules['readline'] = None"],
                         stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "dumb",
                              "PYTHON_BASIC_REPL": "1"})
    os.close(slave)
    # (a queued ^D is lost on Linux ptys when sent before the reader
    # starts, so the transcript ends with a statement that exits)
    os.write(master, text.encode("utf-8") + b"raise SystemExit\n")
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([master], [], [], left)[0]:
                raise Timeout("python3 -i did not finish; printed %r" % bytes(out))
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            out.extend(chunk)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
        p.wait()
    return out.decode("utf-8", "replace")


def scripted(client, steps, timeout=TIMEOUT):
    """conftest.Client: send each (line, prompt-to-wait-for) step; return
    the concatenated transcript (str) including each prompt."""
    got = bytearray()
    for line, prompt in steps:
        client.send(line + "\n")
        got.extend(client.read_until(prompt, timeout))
    return got.decode("utf-8", "replace")
