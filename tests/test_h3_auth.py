"""Hardening III, the server's side of TCP authentication (issue 15, points
1, 2, 11 and 15): the secret file is named after the address the host
bound (wire.h), a client can prove it knows the secret without sending it
(and the server proves it first), unauthenticated connections have a
deadline, a small cap of their own and a few bytes of buffer, and a host
only ever removes the secret file it wrote.

Everything runs against real hosts over real sockets; proofs are computed
here with Python's hmac, independently of wire.c."""
import hashlib
import hmac
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import (BUILD, DEMO, HOST, PS1, TIMEOUT, Client, Proc, default_secret_path,
                      endpoint)
from session_util import ExtClient, Record

WIRE_TEST = BUILD / "tests" / "hosts" / "wire-test"
IAC, SB, SE = 255, 250, 240
AUTH_FAILED = b"manhole: authentication failed\n"
TOO_MANY_PENDING = b"manhole: too many connections waiting to authenticate; try again later\n"
GREETING = b"Well this is neat\n>>> "
AUTH_PENDING_MAX = 16  # manhole.c

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def record(payload):
    """IAC SB 77 payload IAC SE (0xFF doubled)."""
    return bytes([IAC, SB, 77]) + payload.replace(b"\xff", b"\xff\xff") + bytes([IAC, SE])


def proof(secret, side, cnonce, snonce, ep):
    msg = "manhole-auth-1 %s\n%s\n%s\n%s" % (side, cnonce, snonce, ep)
    return hmac.new(secret.encode(), msg.encode(), hashlib.sha256).hexdigest()


def read_secret(path):
    text = Path(path).read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", text), text
    return text[:-1]


def free_port(host="127.0.0.1"):
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def have_ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


class Challenger:
    """A TCP client doing wire.h's challenge-response by hand."""

    def __init__(self, port, host="127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        peer = self.sock.getpeername()
        self.endpoint = endpoint(peer[0], peer[1])
        self.cnonce = secrets.token_hex(16)
        self.client = Client(self.sock, greet=False)

    def challenge(self, cnonce=None):
        self.cnonce = cnonce or self.cnonce
        self.client.send(record(b"A1 " + self.cnonce.encode()))
        got = self.client.read_until(bytes([IAC, SE]))
        m = re.fullmatch(rb"\xff\xfa\x4dA1 ([0-9a-f]{32}) ([0-9a-f]{64})\xff\xf0", got)
        assert m, got
        self.snonce, self.sproof = m.group(1).decode(), m.group(2).decode()
        return self.snonce, self.sproof

    def server_proof_ok(self, secret, ep=None):
        want = proof(secret, "server", self.cnonce, self.snonce, ep or self.endpoint)
        return hmac.compare_digest(want, self.sproof)

    def respond(self, cproof):
        self.client.send(record(b"A" + cproof.encode()))

    def login(self, secret):
        self.challenge()
        assert self.server_proof_ok(secret)
        cproof = proof(secret, "client", self.cnonce, self.snonce, self.endpoint)
        self.respond(cproof)
        return cproof


def tcp_host(start, *args, env=None):
    p = start(DEMO, "--port", "0", *args, path=False, env=env)
    return p, default_secret_path(p.tcp_port, env=env)


def tcp_host_file(start, sockdir, *args):
    """A host that writes its secret where it is told (whatever the rule)."""
    f = sockdir / "tcp.secret"
    return start(DEMO, "--port", "0", "--secret-file", f, *args, path=False), f


# ---- wire.c against Python ----------------------------------------------------------

def wire(lines):
    r = subprocess.run([str(WIRE_TEST)], input="".join(l + "\n" for l in lines).encode(),
                       stdout=subprocess.PIPE, timeout=TIMEOUT, check=True)
    return r.stdout.decode().splitlines()


def hx(b):
    return b.hex() if b else "-"


def test_wire_sha256_and_hmac_agree_with_hashlib():
    data = [os.urandom(n) for n in list(range(0, 130)) + [183, 1000, 4096]]
    keys = [os.urandom(n) for n in (0, 1, 32, 63, 64, 65, 128, 200)]
    msgs = [os.urandom(n) for n in (0, 1, 55, 56, 64, 119, 120, 1000)]
    lines = ["sha256 " + hx(d) for d in data]
    lines += ["hmac %s %s" % (hx(k), hx(m)) for k in keys for m in msgs]
    got = wire(lines)
    want = [hashlib.sha256(d).hexdigest() for d in data]
    want += [hmac.new(k, m, hashlib.sha256).hexdigest() for k in keys for m in msgs]
    assert got == want


def test_wire_proofs_agree_with_python_hmac():
    cases = []
    for side in ("server", "client"):
        for sec in ("a" * 64, "x", "s" * 128, "héllo wörld"):
            for ep in ("127.0.0.1:7000", "[::1]:65535", "127.0.0.2:1"):
                cases.append((side, sec, secrets.token_hex(16), secrets.token_hex(16), ep))
    got = wire(["proof %s %s %s %s %s" % (side, hx(sec.encode()), cn, sn, ep)
                for side, sec, cn, sn, ep in cases])
    assert got == [proof(sec, side, cn, sn, ep) for side, sec, cn, sn, ep in cases]
    # the two sides' proofs differ, and so do two endpoints'
    assert proof("k", "server", "a", "b", "e") != proof("k", "client", "a", "b", "e")


def test_wire_endpoints_paths_nonces_and_equal():
    got = wire(["endpoint 127.0.0.1 7000", "endpoint ::1 7000", "endpoint ::ffff:127.0.0.2 80",
                "endpoint 0.0.0.0 1", "endpoint fe80::1 9",
                "path 1234 127.0.0.1:7000", "random 16", "random 16",
                "equal abc abc", "equal abc abd"])
    assert got[:5] == ["127.0.0.1:7000", "[::1]:7000", "127.0.0.2:80", "0.0.0.0:1", "[fe80::1]:9"]
    assert got[5] == str(default_secret_path(7000).parent / "tcp-127.0.0.1:7000.secret").replace(
        "manhole-%d" % os.geteuid(), "manhole-1234")
    assert re.fullmatch("[0-9a-f]{32}", got[6]) and got[6] != got[7]
    assert got[8:] == ["1", "0"]


# ---- 1. The secret file names the endpoint; the challenge-response ----------------

def test_secret_file_is_named_after_the_bound_address(start, sockdir):
    run = sockdir / "run"
    run.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(run)}
    p, f = tcp_host(start, env=env)
    assert f == run / "manhole" / ("tcp-127.0.0.1:%d.secret" % p.tcp_port)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert not (run / "manhole" / ("tcp-%d.secret" % p.tcp_port)).exists()
    # the log names the file
    p.wait_for(r"tcp 127\.0\.0\.1:%d: the secret clients prove \(or send first\) is in %s"
               % (p.tcp_port, re.escape(str(f))), stream="err")
    c = Client.tcp(p.tcp_port, secret=read_secret(f))
    assert c.greeting == GREETING
    p.stop()
    assert not f.exists()


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback")
def test_secret_file_of_an_ipv6_listener_is_bracketed(start):
    p = start(DEMO, "--port", "0", "--host", "::1", path=False)
    f = default_secret_path(p.tcp_port, "::1")
    assert f.name == "tcp-[::1]:%d.secret" % p.tcp_port
    c = Client.tcp(p.tcp_port, host="::1", secret=read_secret(f))
    assert c.cmd("6 * 7") == "42\n"
    ch = Challenger(p.tcp_port, host="::1")
    ch.login(read_secret(f))
    assert ch.client.read_until(PS1) == GREETING


def test_plain_client_sending_the_secret_line_works_as_before(start):
    p, f = tcp_host(start)
    c = Client.tcp(p.tcp_port, secret=read_secret(f) + "\r")  # CRLF too
    assert c.greeting == GREETING
    assert c.cmd("1 + 1") == "2\n"
    # README's recipe: the file's content, then the input
    nc = shutil.which("nc")
    assert nc, "netcat-openbsd must be installed"
    r = subprocess.run([nc, "-N", "127.0.0.1", str(p.tcp_port)],
                       input=f.read_bytes() + b"print(6 * 7)\n", stdout=subprocess.PIPE,
                       timeout=TIMEOUT)
    assert r.stdout == GREETING + b"42\n>>> ", r.stdout


def test_challenge_response_with_the_right_proof_gets_the_prompt(start):
    p, f = tcp_host(start)
    secret = read_secret(f)
    ch = Challenger(p.tcp_port)
    ch.login(secret)
    assert ch.client.read_until(PS1) == GREETING
    assert ch.client.cmd("'in'") == "'in'\n"
    p.wait_for(r"client #\d+ authenticated", stream="err")
    # and the extended channel's hello comes after it, as after a secret line
    ch2 = Challenger(p.tcp_port)
    ch2.login(secret)
    ext = ExtClient(ch2.sock)
    assert ext.banner == b"Well this is neat\n"
    assert ext.statement("2 + 2") == ("4\n", "0", Record("P", b"1>>> "))


def test_challenge_response_the_server_proves_it_first_and_binds_the_endpoint(start):
    p, f = tcp_host(start)
    secret = read_secret(f)
    ch = Challenger(p.tcp_port)
    ch.challenge()
    assert ch.server_proof_ok(secret)
    # relayed to a client that reached another endpoint, it proves nothing
    assert not ch.server_proof_ok(secret, "[::1]:%d" % p.tcp_port)
    assert not ch.server_proof_ok(secret, "127.0.0.2:%d" % p.tcp_port)
    assert not ch.server_proof_ok("0" * 64)
    # nothing but the answer was sent: no banner, no prompt
    assert ch.client.buf == b""


def test_challenge_response_with_a_wrong_proof_is_refused_and_logged(start):
    p, f = tcp_host(start)
    secret = read_secret(f)
    ch = Challenger(p.tcp_port)
    ch.challenge()
    ch.respond(proof("0" * 64, "client", ch.cnonce, ch.snonce, ch.endpoint))
    assert ch.client.read_all() == AUTH_FAILED
    p.wait_for(r"client #\d+ \(tcp 127\.0\.0\.1:\d+\) refused: wrong or missing secret",
               stream="err")
    # the server's proof sent back as the client's is no proof
    ch = Challenger(p.tcp_port)
    ch.challenge()
    ch.respond(ch.sproof)
    assert ch.client.read_all() == AUTH_FAILED
    # a proof for another endpoint neither
    ch = Challenger(p.tcp_port)
    ch.challenge()
    ch.respond(proof(secret, "client", ch.cnonce, ch.snonce, "[::1]:%d" % p.tcp_port))
    assert ch.client.read_all() == AUTH_FAILED


def test_challenge_response_replayed_proof_is_refused(start):
    p, f = tcp_host(start)
    secret = read_secret(f)
    first = Challenger(p.tcp_port)
    old = first.login(secret)
    assert first.client.read_until(PS1) == GREETING
    # the same client nonce again: the server's nonce is fresh, the old proof is void
    again = Challenger(p.tcp_port)
    snonce, _ = again.challenge(cnonce=first.cnonce)
    assert snonce != first.snonce
    again.respond(old)
    assert again.client.read_all() == AUTH_FAILED


@pytest.mark.parametrize("first", [
    record(b"A1 " + b"0" * 31),                       # short nonce
    record(b"A1 " + b"A" * 32),                       # not lowercase hex
    record(b"A2 " + b"0" * 32),                       # another version
    record(b"A1 " + b"0" * 32 + b" "),                # trailing bytes
    record(b"A"),                                     # empty
    record(b"H"),                                     # hello before authenticating
    record(b"E<stdin>\nprint('ran')"),                # a script before it
    b"x" + record(b"A1 " + b"0" * 32),                # not its first bytes
])
def test_malformed_challenge_is_refused(start, first):
    p, f = tcp_host(start)
    c = Client.tcp(p.tcp_port, secret=None, greet=False)
    c.send(first)
    c.send(b"\n")  # (a lone "x" line is refused too)
    assert c.read_all() == AUTH_FAILED


@pytest.mark.parametrize("after", [
    "line",        # a secret line in the middle of the exchange
    "junk",        # bytes, then the proof
    "proof+1",     # the proof with one more byte
    "upper",       # the proof in upper case
    "challenge",   # a second challenge instead of a proof
])
def test_malformed_response_is_refused(start, after):
    p, f = tcp_host(start)
    secret = read_secret(f)
    ch = Challenger(p.tcp_port)
    ch.challenge()
    cproof = proof(secret, "client", ch.cnonce, ch.snonce, ch.endpoint)
    send = {"line": secret.encode() + b"\n",
            "junk": b"junk" + record(b"A" + cproof.encode()),
            "proof+1": record(b"A" + cproof.encode() + b"0"),
            "upper": record(b"A" + cproof.upper().encode()),
            "challenge": record(b"A1 " + ch.cnonce.encode())}[after]
    ch.client.send(send)
    ch.client.send(b"\n")
    assert ch.client.read_all() == AUTH_FAILED


def test_challenge_response_proves_the_secret_the_host_gave(start):
    p = start(HOST, "--port", "0", "--tcp-secret", "given secret", path=False)
    assert not default_secret_path(p.tcp_port).exists()
    ch = Challenger(p.tcp_port)
    ch.login("given secret")
    assert PS1 in ch.client.read_until(PS1)
    assert Client.tcp(p.tcp_port, secret="given secret").cmd("1") == "1\n"


def test_challenge_proof_uses_the_address_the_connection_reached(start):
    # A listener on every address: the proof names the one this connection
    # reached (getsockname() of the accepted socket), as the client's
    # getpeername() does, not 0.0.0.0.
    p = start(HOST, "--port", "0", "--host", "0.0.0.0", "--allow-nonlocal",
              "--tcp-secret", "k", path=False)
    for addr in ("127.0.0.1", "127.0.0.2"):
        ch = Challenger(p.tcp_port, host=addr)
        ch.challenge()
        assert ch.endpoint == "%s:%d" % (addr, p.tcp_port)
        assert ch.server_proof_ok("k")
        assert not ch.server_proof_ok("k", "0.0.0.0:%d" % p.tcp_port)


# ---- 2. Unauthenticated clients: a deadline, a cap of their own, a few bytes -------

def silent_tcp_as_nobody(port, n):
    """n TCP connections held by uid 65534 until stdin closes."""
    code = ("import socket, sys\n"
            "s = [socket.create_connection(('127.0.0.1', %d)) for _ in range(%d)]\n"
            "print('connected', flush=True)\n"
            "sys.stdin.read()\n" % (port, n))
    h = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, preexec_fn=lambda: os.setuid(65534))
    assert h.stdout.readline() == b"connected\n"
    return h


@root_only
def test_silent_tcp_clients_of_another_user_do_not_lock_out_the_owner(start, sockdir):
    p = start(DEMO, "--port", "0", "--max-clients", "10")
    f = default_secret_path(p.tcp_port)
    h = silent_tcp_as_nobody(p.tcp_port, 10)
    try:
        p.wait_for(r"(?s)(accepted client #\d+ \(tcp .*?){10}", stream="err")
        owner = p.client()  # the UNIX client of the host's user
        assert owner.greeting == GREETING
        assert owner.cmd("'owner'") == "'owner'\n"
        tcp = Client.tcp(p.tcp_port, secret=read_secret(f))  # and a TCP one who knows
        assert tcp.cmd("'tcp owner'") == "'tcp owner'\n"
    finally:
        h.stdin.close()
        h.wait(TIMEOUT)


def test_unauthenticated_connections_past_the_cap_are_refused_at_once(start):
    p = start(DEMO, "--port", "0", "--max-clients", "2")
    f = default_secret_path(p.tcp_port)
    silent = [socket.create_connection(("127.0.0.1", p.tcp_port), timeout=TIMEOUT)
              for _ in range(AUTH_PENDING_MAX)]
    extra = Client.tcp(p.tcp_port, secret=None, greet=False)
    assert extra.read_all() == TOO_MANY_PENDING
    p.wait_for(r"refused client \(tcp 127\.0\.0\.1:\d+\): %d connections already waiting"
               % AUTH_PENDING_MAX, stream="err")
    # the UNIX clients do not care
    assert p.client().cmd("1") == "1\n"
    # one waiting connection goes away: its place is free again
    silent.pop().close()
    p.wait_for(r"closed \(authentication failed\)", stream="err")
    c = Client.tcp(p.tcp_port, secret=read_secret(f), greet=False)
    got = c.read_until(PS1)
    assert got == GREETING, got
    for s in silent:
        s.close()


def test_authenticated_tcp_clients_count_against_max_clients_only_once_in(start):
    p = start(DEMO, "--port", "0", "--max-clients", "1")
    f = default_secret_path(p.tcp_port)
    waiting = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=TIMEOUT)
    p.wait_for(r"accepted client #\d+ \(tcp ", stream="err")
    a = p.client()  # the one place, though a TCP connection came first
    assert a.cmd("'a'") == "'a'\n"
    b = Client.tcp(p.tcp_port, secret=read_secret(f), greet=False)
    assert b.read_all() == b"manhole: too many clients (limit 1); try again later\n"
    waiting.close()


def test_unauthenticated_client_is_closed_at_its_deadline(start, sockdir):
    p, f = tcp_host_file(start, sockdir)
    c = Client.tcp(p.tcp_port, secret=None, greet=False)
    c.send(read_secret(f)[:10])  # a start, never finished
    ch = Challenger(p.tcp_port)  # halfway through the exchange too
    ch.challenge()
    assert c.read_all() == AUTH_FAILED
    assert ch.client.read_all() == AUTH_FAILED
    p.wait_for(r"(?s)(refused: not authenticated in time.*){2}", stream="err")


@pytest.mark.parametrize("data", [
    b"x" * 129,                                   # longer than any secret line
    record(b"A1 ")[:-2] + b"0" * 200,             # an authentication record that never ends
    bytes([IAC, SB, 24]) + b"t" * 100,            # another option's subnegotiation
])
def test_unauthenticated_client_sending_more_than_a_secret_is_refused_at_once(start, sockdir, data):
    p, f = tcp_host_file(start, sockdir)
    c = Client.tcp(p.tcp_port, secret=None, greet=False)
    c.send(data)
    assert c.read_all() == AUTH_FAILED
    # for what it sent, not for running out of time
    p.wait_for(r"refused: wrong or missing secret", stream="err")
    assert "not authenticated in time" not in p.err


def test_unauthenticated_clients_cannot_make_the_host_buffer_megabytes(start, sockdir):
    p, f = tcp_host_file(start, sockdir)
    status = lambda: open("/proc/%d/status" % p.p.pid).read()
    rss_kb = lambda key: int(status().split(key + ":")[1].split()[0])
    assert Client.tcp(p.tcp_port, secret=read_secret(f)).cmd("1") == "1\n"  # warm
    base = rss_kb("VmHWM")
    # What issue 15 measured: a line of max_line - 1 bytes, then an
    # unterminated subnegotiation of ours as long, from 40 connections.
    payload = b"x" * ((1 << 20) - 1) + bytes([IAC, SB, 77]) + b"y" * (1 << 20)
    conns = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=TIMEOUT)
        try:
            s.sendall(payload)
        except OSError:
            pass  # refused before it was all sent
        conns.append(Client(s, greet=False))
    for c in conns:  # every one of them is refused, none held (the refusal
        got = c.read_all()  # may be lost to a reset: it left bytes unread)
        assert got in (AUTH_FAILED, TOO_MANY_PENDING, b""), got
    grown_mb = (rss_kb("VmHWM") - base) / 1024
    assert grown_mb < 24, "host RSS peaked %d MB above its start" % grown_mb


# ---- 11. Two hosts on one port number ------------------------------------------------

def test_two_hosts_on_one_port_number_keep_their_own_secret_files(start):
    a = start(DEMO, "--port", "0", path=False)
    port = a.tcp_port
    b = start(DEMO, "--port", str(port), "--host", "127.0.0.2", path=False)
    fa, fb = default_secret_path(port), default_secret_path(port, "127.0.0.2")
    sa, sb = read_secret(fa), read_secret(fb)
    assert sa != sb
    assert Client.tcp(port, secret=sa).cmd("'a'") == "'a'\n"
    assert Client.tcp(port, host="127.0.0.2", secret=sb).cmd("'b'") == "'b'\n"
    b.stop()
    assert not fb.exists()
    assert read_secret(fa) == sa  # a's file is still there, still a's
    assert Client.tcp(port, secret=read_secret(fa)).cmd("'a again'") == "'a again'\n"


@pytest.mark.parametrize("where", ["default", "--secret-file"])
def test_host_never_removes_a_secret_file_it_did_not_write(start, sockdir, where):
    p, f = tcp_host(start) if where == "default" else tcp_host_file(start, sockdir)
    # someone (another host, the user) put a new file at that name since
    f.unlink()
    f.write_text("not yours\n")
    os.chmod(f, 0o600)
    p.stop()
    assert f.read_text() == "not yours\n"
    f.unlink()


def test_a_stale_secret_file_of_our_endpoint_is_replaced(start):
    port = free_port()
    f = default_secret_path(port)
    f.parent.mkdir(mode=0o700, exist_ok=True)
    f.write_text("stale\n")
    os.chmod(f, 0o600)
    p = start(DEMO, "--port", str(port), path=False)
    secret = read_secret(f)
    assert Client.tcp(port, secret=secret).cmd("'fresh'") == "'fresh'\n"
    p.stop()
    assert not f.exists()


# ---- 15. One rule for the directory ---------------------------------------------------

def test_relative_xdg_runtime_dir_is_ignored_and_the_log_names_the_file(start):
    env = {"XDG_RUNTIME_DIR": "relative/run"}
    p, f = tcp_host(start, env=env)
    assert f == Path("/tmp/manhole-%d" % os.geteuid()) / ("tcp-127.0.0.1:%d.secret" % p.tcp_port)
    p.wait_for(re.escape(str(f)), stream="err")
    assert Client.tcp(p.tcp_port, secret=read_secret(f)).cmd("5") == "5\n"


def test_an_error_about_the_secret_file_names_the_new_path(sockdir):
    port = free_port()
    f = default_secret_path(port)
    f.parent.mkdir(mode=0o700, exist_ok=True)
    f.mkdir()
    try:
        r = subprocess.run([str(DEMO), "--port", str(port)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=TIMEOUT)
        assert r.returncode != 0
        assert ("%s: exists and is a directory" % f) in r.stderr.decode(), r.stderr
    finally:
        f.rmdir()


# ---- The sweep: nothing is done for a client before it is in -----------------------

def test_unauthenticated_bytes_are_never_logged_nor_run(start, sockdir):
    p, f = tcp_host_file(start, sockdir, "--audit")
    marker = sockdir / "ran"
    c = Client.tcp(p.tcp_port, secret=None, greet=False)
    c.send("open(%r, 'w').write('x')  # guess-4711\n" % str(marker))
    assert c.read_all() == AUTH_FAILED
    # interrupts and completion requests before the secret do nothing either
    c = Client.tcp(p.tcp_port, secret=None, greet=False)
    c.send(bytes([IAC, 244]) + record(b"C1 os.") + b"\n")
    assert c.read_all() == AUTH_FAILED
    ok = Client.tcp(p.tcp_port, secret=read_secret(f))
    assert ok.cmd("'in'") == "'in'\n"
    p.wait_for(r"input: 'in'", stream="err")
    assert "guess-4711" not in p.err and not marker.exists()
