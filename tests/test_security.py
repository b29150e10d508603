"""Access control, limits, and every kind of bad client: each gets a clear
message, nobody else loses anything, and the host is never harmed."""
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import (DEMO, HOST, PORTABLE, PS1, PS2, SANITIZER, TIMEOUT, WRAP, Client, Proc,
                      default_secret_path, wait_true)


def nobody_client(path, send=b""):
    """Connect as uid 65534 in a child process; return what it received
    (or the connect error)."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.settimeout(%r)\n"
        "try:\n"
        "    s.connect(%r)\n"
        "except OSError as e:\n"
        "    sys.stdout.write('connect failed: %%s' %% e.strerror); sys.exit(0)\n"
        "try:\n"
        "    s.sendall(%r)\n"
        "except OSError:\n"
        "    pass\n"
        "data = b''\n"
        "while True:\n"
        "    chunk = s.recv(65536)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "sys.stdout.write(data.decode('utf-8', 'replace'))\n" % (TIMEOUT, str(path), send)
    )
    r = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       preexec_fn=lambda: os.setuid(65534), timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


def host_stats(pid):
    fds = len(os.listdir("/proc/%d/fd" % pid))
    status = open("/proc/%d/status" % pid).read()
    threads = int(status.split("Threads:")[1].split()[0])
    rss_kb = int(status.split("VmRSS:")[1].split()[0])
    return fds, threads, rss_kb


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


# ---- Access control -----------------------------------------------------

def test_socket_created_mode_0600(demo):
    assert stat.S_IMODE(os.stat(demo.unix_path).st_mode) == 0o600


def test_socket_mode_configurable(start):
    p = start(DEMO, "--mode", "660")
    assert stat.S_IMODE(os.stat(p.unix_path).st_mode) == 0o660


@root_only
def test_other_user_cannot_connect_to_0600_socket(demo):
    assert nobody_client(demo.unix_path).startswith("connect failed: Permission denied")


@root_only
def test_other_user_denied_by_credentials_check(start):
    # A world-writable socket: only the peer-credential check stands guard.
    p = start(DEMO, "--mode", "666")
    got = nobody_client(p.unix_path, b"print('ran')\n")
    assert got == "manhole: access denied\n"
    p.wait_for(r"refused client \(unix, (pid \d+, )?uid 65534\): access denied", stream="err")
    # the owner still gets in
    assert p.client().cmd("1") == "1\n"


def test_accepted_clients_are_logged_with_pid_and_uid(demo):
    c = demo.client()
    c.cmd("1")
    # getpeereid() (the portable path) knows no pid
    pid = "" if PORTABLE else "pid %d, " % os.getpid()
    demo.wait_for(r"accepted client #1 \(unix, %suid %d\)" % (pid, os.geteuid()), stream="err")


def test_audit_logs_every_statement(start):
    p = start(DEMO, "--audit")
    p.client().cmd("print('audited')")
    p.wait_for(r"client #1 input: print\('audited'\)", stream="err")


@pytest.mark.parametrize("kind", ["directory", "symlink", "regular file"])
def test_non_socket_at_path_is_never_removed(sockdir, kind):
    path = sockdir / "s"
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        target = sockdir / "target"
        target.write_text("x")
        path.symlink_to(target)
    else:
        path.write_text("x")
    r = subprocess.run([str(DEMO), "--path", str(path)], stderr=subprocess.PIPE, timeout=TIMEOUT)
    assert r.returncode == 1
    err = r.stderr.decode()
    word = {"directory": "a directory", "symlink": "a symbolic link", "regular file": "a regular file"}[kind]
    assert str(path) in err and word in err
    assert os.path.lexists(path)


def test_stale_socket_replaced_but_live_one_kept(start, sockdir):
    a = start(DEMO)
    r = subprocess.run([str(DEMO), "--path", a.unix_path], stderr=subprocess.PIPE, timeout=TIMEOUT)
    assert r.returncode == 1 and "already listening" in r.stderr.decode()
    assert a.client().cmd("'alive'") == "'alive'\n"


def test_tcp_binds_loopback_by_default(start):
    p = start(DEMO, "--port", "0")
    assert "listening on tcp:127.0.0.1:" in p.out


def test_non_loopback_tcp_needs_opt_in(sockdir):
    r = subprocess.run([str(DEMO), "--path", str(sockdir / "s"), "--port", "0", "--host", "0.0.0.0"],
                       stderr=subprocess.PIPE, timeout=TIMEOUT)
    assert r.returncode == 1
    assert "0.0.0.0" in r.stderr.decode() and "not a loopback address" in r.stderr.decode()


def test_non_loopback_tcp_with_opt_in_logs_warning(start):
    p = start(DEMO, "--port", "0", "--host", "0.0.0.0", "--allow-nonlocal")
    p.wait_for(r"warning: listening on non-loopback address 0\.0\.0\.0", stream="err")
    # (the secret file names the address bound: wire.h)
    secret = default_secret_path(p.tcp_port, "0.0.0.0").read_text().strip()
    assert Client.tcp(p.tcp_port, secret=secret).cmd("1") == "1\n"


@pytest.mark.parametrize("request_text", [
    b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 40\r\n\r\nimport os; os._exit(9)\n",
    b"GET /x?y HTTP/1.0\r\n\r\nimport os; os._exit(9)\n",
    b"Host: 127.0.0.1\r\nimport os; os._exit(9)\n",
])
def test_http_looking_tcp_client_dropped_before_anything_runs(start, request_text):
    # (--tcp-insecure: with a secret, such a first line fails it anyway)
    p = start(DEMO, "--port", "0", "--no-banner", "--tcp-insecure")
    s = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=TIMEOUT)
    assert s.recv(100) == b">>> "
    s.sendall(request_text)
    assert s.recv(100) == b""  # dropped, nothing answered
    s.close()
    p.wait_for(r"dropped: its first bytes look like HTTP", stream="err")
    # the host is alive: nothing ran
    assert Client.tcp(p.tcp_port).cmd("'alive'") == "'alive'\n"
    assert p.p.poll() is None


# ---- Limits ----------------------------------------------------------------

def test_over_long_line_discarded_session_goes_on(start):
    p = start(DEMO, "--max-line", "1000")
    c = p.client()
    out = c.cmd("x = '" + "a" * 5000 + "'")
    assert out == "manhole: line too long (more than 1000 bytes); discarded\n"
    assert c.cmd("1 + 1") == "2\n"


def test_ten_megabytes_without_newline_memory_bounded(start):
    p = start(DEMO, "--max-line", "65536")
    c = p.client()
    c.cmd("1")
    before = host_stats(p.p.pid)[2]
    chunk = b"z" * 65536
    for _ in range(160):  # 10 MiB, and no newline
        c.send(chunk)
    # told as soon as the line is too long, not when (if ever) it ends
    assert c.read_until(PS1) == b"manhole: line too long (more than 65536 bytes); discarded\n>>> "
    after = host_stats(p.p.pid)[2]
    if not (SANITIZER or WRAP):
        assert after - before < 4096  # KiB: nowhere near the 10 MiB sent
    c.send(b"\n")  # the end of the discarded line: nothing more to say
    assert c.cmd("'ok'") == "'ok'\n"


def test_client_that_stops_reading_pauses_only_itself(start):
    p = start(DEMO, "--max-output", "65536", "--timeout", "0")
    a = p.client()
    b = p.client()
    before = host_stats(p.p.pid)[2]
    # a asks for 20 MB of output and reads none of it
    a.send("for i in range(200000): print('x' * 99)\n\n")
    a.read_until(PS2)
    # b carries on, many times over
    for i in range(50):
        assert b.cmd("%d * 2" % i) == "%d\n" % (i * 2)
    if not (SANITIZER or WRAP):  # their allocators keep freed memory on purpose
        assert host_stats(p.p.pid)[2] - before < 8192  # KiB: bounded, not 20 MB
    # and a gets every byte once it reads
    total = 0
    while True:
        chunk = a.read_until(b"\n")
        if chunk.endswith(b">>> ") or chunk == b">>> ":
            break
        assert chunk == b"x" * 99 + b"\n"
        total += 1
        if total == 200000:
            break
    assert total == 200000
    assert a.read_until(PS1) == PS1


def test_nonthreaded_client_that_stops_reading_is_bounded_by_timeout(start):
    """Non-threaded: a flooding statement whose client does not read blocks
    the host (as any non-threaded statement does) only until its timeout."""
    p = start(DEMO, "--no-threaded", "--max-output", "65536", "--timeout", "1")
    b = p.client()
    a = p.client()
    a.send("for i in range(10 ** 7): print('x' * 99)\n\n")
    a.read_until(PS2)
    # b is served once the flood has timed out
    assert b.cmd("'b served'") == "'b served'\n"
    out = a.read_until(PS1)
    assert out.endswith(b"TimeoutError: statement timed out after 1 seconds; "
                        b"KeyboardInterrupt sent to it\n>>> ")
    assert a.cmd("1") == "1\n"


def test_client_cap_refuses_one_past_the_cap(start):
    p = start(DEMO, "--max-clients", "3")
    clients = [p.client() for _ in range(3)]
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(TIMEOUT)
    s.connect(p.unix_path)
    data = b""
    while True:
        chunk = s.recv(1000)
        if not chunk:
            break
        data += chunk
    assert data == b"manhole: too many clients (limit 3); try again later\n"
    p.wait_for(r"refused client .*too many clients \(limit 3\)", stream="err")
    for c in clients:
        assert c.cmd("1") == "1\n"
    clients[0].close()
    wait_true(lambda: clients[1].cmd("1") == "1\n" and "closed" in p.err, what="slot freed")
    assert p.client().cmd("2") == "2\n"


def test_host_with_1100_files_served_through_poll(start):
    p = start(HOST, "--open-files", "1100", "--loop", "poll")
    c = p.client()
    assert c.cmd("import os; max(int(f) for f in os.listdir('/proc/self/fd')) > 1024") == "True\n"
    assert c.cmd("print('fine')") == "fine\n"


def test_fdset_host_refuses_descriptor_beyond_fd_setsize(start):
    p = start(HOST, "--open-files-after", "1100", "--loop", "select")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(TIMEOUT)
    s.connect(p.unix_path)
    data = s.recv(1000)
    assert data == b"manhole: the host has too many open files; refused\n"
    assert s.recv(1000) == b""
    p.wait_for(r"does not fit in the host's fd_set \(FD_SETSIZE 1024\)", stream="err")
    assert p.p.poll() is None


def test_fdset_host_with_listener_beyond_fd_setsize_is_told(start):
    p = start(HOST, "--open-files", "1100", "--loop", "select", wait_listening=False)
    p.wait_for(r"descriptor \d+ does not fit in an fd_set", stream="err")
    assert p.wait() == 3


# ---- Bad bytes and bad clients ----------------------------------------------

def test_invalid_utf8_discarded_with_message(demo):
    c = demo.client()
    c.send(b"x = '\xc3\x28'\n")
    assert c.read_until(PS1) == b"manhole: line discarded: not valid UTF-8 (byte 6 is 0xc3)\n>>> "
    c.send(b"x = '\xffA'\n")  # 0xFF that is no telnet command
    assert c.read_until(PS1) == b"manhole: line discarded: not valid UTF-8 (byte 6 is 0xff)\n>>> "
    c.send(b"\xed\xa0\x80\n")  # a UTF-8-encoded surrogate: Python refuses it too
    assert c.read_until(PS1).startswith(b"manhole: line discarded: not valid UTF-8")
    assert c.cmd("'\u00e9'") == "'\u00e9'\n"  # valid UTF-8 still fine


def test_nul_byte_discarded_with_message(demo):
    c = demo.client()
    c.send(b"print(1)\x00\n")
    assert c.read_until(PS1) == b"manhole: line with a NUL byte discarded\n>>> "
    assert c.cmd("2") == "2\n"


def test_crlf_and_lone_cr_end_lines(demo):
    c = demo.client()
    c.send(b"1 + 1\r\n")
    assert c.read_until(PS1) == b"2\n>>> "
    c.send(b"2 + 2\r3 + 3\r")
    assert c.read_until(PS1) == b"4\n>>> "
    assert c.read_until(PS1) == b"6\n>>> "
    c.send(b"for i in (1, 2):\r\n    print(i)\r\n\r\n")
    c.read_until(PS2)
    c.read_until(PS2)
    assert c.read_until(PS1) == b"1\n2\n>>> "


def test_telnet_iac_sequences_dropped(demo):
    c = demo.client()
    # WILL/DO negotiation, a subnegotiation, then a statement
    c.send(b"\xff\xfb\x1f\xff\xfd\x01\xff\xfa\x18\x00xterm\xff\xf0" + b"7 * 6\r\n")
    assert c.read_until(PS1) == b"42\n>>> "


def test_one_byte_at_a_time(demo):
    c = demo.client()
    for b in b"print('slow')\n":
        c.send(bytes([b]))
    assert c.read_until(PS1) == b"slow\n>>> "


def test_binary_garbage_then_session_goes_on(demo):
    c = demo.client()
    garbage = bytes((i * 37 + 11) % 256 for i in range(20000))
    c.send(garbage + b"\n")
    c.send(b"'after'\n")
    out = c.read_until(b"'after'\n>>> ").decode("utf-8", "replace")
    assert "manhole: line" in out
    assert c.cmd("1") == "1\n"
    assert demo.p.poll() is None


def test_silent_client_harms_nobody(start):
    p = start(DEMO, "--idle-timeout", "1")
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(p.unix_path)
    other = p.client()
    assert other.cmd("1") == "1\n"
    silent.settimeout(TIMEOUT)
    data = b""
    while True:
        chunk = silent.recv(1000)
        if not chunk:
            break
        data += chunk
    assert data.endswith(b"manhole: idle for 1 seconds; closing\n")


def test_reset_mid_statement_harms_nobody(start):
    p = start(DEMO, "--timeout", "0")
    b = p.client()
    b.cmd("started = done = False")
    a = p.client()
    a.send("try:\n    started = True\n    while True:\n        n = 1\nfinally:\n    done = True\n\n")
    wait_true(lambda: b.cmd("started") == "True\n", what="statement started")
    a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()  # RST
    wait_true(lambda: b.cmd("done") == "True\n", what="statement interrupted")
    assert p.p.poll() is None


def test_close_with_output_pending_no_sigpipe(start):
    """The demo keeps the default SIGPIPE disposition: a SIGPIPE would kill
    it. Clients asking for lots of output and vanishing must not."""
    p = start(DEMO, "--timeout", "0")
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX)
        s.connect(p.unix_path)
        s.sendall(b"for i in range(100000): print('y' * 200)\n\n")
        s.recv(10)
        s.close()
    tcp = start(DEMO, "--port", "0", "--path", p.unix_path + "2")
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", tcp.tcp_port))
        s.sendall(b"for i in range(100000): print('y' * 200)\n\n")
        s.recv(10)
        s.close()
    assert p.client().cmd("'alive'") == "'alive'\n"
    assert Client.tcp(tcp.tcp_port).cmd("'alive'") == "'alive'\n"
    assert p.p.poll() is None and tcp.p.poll() is None


@pytest.mark.parametrize("loop", ["poll", "select"])
def test_eintr_everywhere(start, loop):
    """Signals (handler without SA_RESTART) rain on the host while
    clients work; nothing breaks."""
    p = start(HOST, "--loop", loop, "--shared")
    stop = threading.Event()

    def rain():
        while not stop.is_set():
            os.kill(p.p.pid, signal.SIGUSR1)

    t = threading.Thread(target=rain)
    t.start()
    try:
        clients = [p.client() for _ in range(4)]
        for k in range(30):
            for i, c in enumerate(clients):
                assert c.cmd("print(%d + %d)" % (k, i)) == "%d\n" % (k + i)
        assert clients[0].cmd("import time; time.sleep(0.2); add(1, 2)") == "3\n"
    finally:
        stop.set()
        t.join()
    assert p.stop() == 0
    assert " SIGUSR1" in p.out and "closed after" in p.out


def test_many_connect_disconnect_cycles_no_growth(start):
    # one worker: the pool's size is then the same before and after, and
    # any thread left behind by a session shows
    p = start(HOST, "--max-clients", "1000", "--max-workers", "1")
    pid = p.p.pid

    def cycles(n, statement):
        for _ in range(n):
            c = Client.unix(p.unix_path)
            if statement:
                c.cmd("x = 1")
            c.close()

    # warm up: pools, caches and allocator arenas reach their steady size
    cycles(300, False)
    cycles(300, True)
    wait_true(lambda: p.client().cmd("1") == "1\n")
    fds0, threads0, rss0 = host_stats(pid)
    slow = bool(WRAP)  # under valgrind: fewer cycles, same checks
    cycles(500 if slow else 10000, False)
    cycles(100 if slow else 1000, True)
    # everything closed has been reaped: the host is back to its clients
    wait_true(lambda: host_stats(pid)[0] <= fds0, what="descriptors released")
    fds1, threads1, rss1 = host_stats(pid)
    assert fds1 <= fds0
    assert threads1 <= threads0
    if not (SANITIZER or WRAP):  # their allocators keep freed memory on purpose
        assert rss1 - rss0 < 4096, (rss0, rss1)  # KiB


def test_fork_child_does_not_serve_or_unlink(start, sockdir):
    p = start(HOST, "--fork")
    p.wait_for(r"parent: child exited 0")
    assert "child: poll=-9 fd=-9" in p.out
    assert stat.S_ISSOCK(os.lstat(p.unix_path).st_mode)
    assert p.client().cmd("'parent serves'") == "'parent serves'\n"
