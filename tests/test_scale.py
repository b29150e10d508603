"""Many clients at once, the default client limit, and output that a worker
sends itself (issue 11): every client gets exactly its own bytes, in order,
and a client that stops reading holds up nobody but itself."""
import resource
import socket
import time

import pytest

from conftest import DEMO, PS1, PS2, TIMEOUT, WRAP, wait_true


def default_max_clients(soft_limit):
    """The rule manhole_open applies when max_clients is left at 0: the
    descriptor limit less a reserve of max(64, a quarter), half of it for
    limits under 128."""
    n = soft_limit - max(64, soft_limit // 4)
    return max(n, soft_limit // 2, 1)


def soft_nofile(n):
    """A preexec_fn giving the host a soft descriptor limit of n."""
    def set_limit():
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    return set_limit


@pytest.fixture(autouse=True)
def room_for_clients():
    """This process holds one descriptor per client: raise its soft limit
    (its children get their own, set explicitly where it matters)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def host_limit(client):
    """The host's soft descriptor limit as the host itself sees it (under
    valgrind, less the descriptors valgrind keeps for itself)."""
    return int(client.cmd("import resource; resource.getrlimit(resource.RLIMIT_NOFILE)[0]"))


def refusal(path):
    """Connect and read what the server says before it closes."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(TIMEOUT)
    s.connect(path)
    data = b""
    while True:
        chunk = s.recv(1000)
        if not chunk:
            break
        data += chunk
    s.close()
    return data


def test_default_limit_admits_500_concurrent_clients_each_getting_its_own_output(start):
    # the common soft limit of 1024 descriptors: 768 clients by default
    p = start(DEMO, preexec_fn=soft_nofile(1024))
    clients = [p.client()]
    limit = default_max_clients(host_limit(clients[0]))
    assert limit >= 500
    p.wait_for(r"at most %d clients" % limit, stream="err")
    clients += [p.client() for _ in range(499)]
    for i, c in enumerate(clients):
        assert c.greeting == b"Well this is neat\n>>> "
        c.send("import time; print('c%d-a'); time.sleep(0.05); print('c%d-b')\n" % (i, i))
    for i, c in enumerate(clients):
        assert c.read_until(PS1) == b"c%d-a\nc%d-b\n>>> " % (i, i)
    # and each still gets its own answers afterwards
    for i, c in enumerate(clients[:50]):
        assert c.cmd("print(%d * 3)" % i) == "%d\n" % (i * 3)
    for c in clients:
        c.close()


def test_client_past_the_default_limit_gets_the_one_line_refusal(start):
    # a soft limit of 200 descriptors: 200 - max(64, 50) = 136 clients
    p = start(DEMO, preexec_fn=soft_nofile(200))
    clients = [p.client()]
    limit = default_max_clients(host_limit(clients[0]))
    p.wait_for(r"at most %d clients" % limit, stream="err")
    clients += [p.client() for _ in range(limit - 1)]
    assert refusal(p.unix_path) == (
        b"manhole: too many clients (limit %d); try again later\n" % limit)
    p.wait_for(r"refused client .*too many clients \(limit %d\)" % limit, stream="err")
    assert clients[0].cmd("'first still served'") == "'first still served'\n"
    assert clients[-1].cmd("'last still served'") == "'last still served'\n"
    clients[0].close()
    wait_true(lambda: clients[1].cmd("1") == "1\n" and "closed" in p.err, what="slot freed")
    assert p.client().cmd("'admitted again'") == "'admitted again'\n"
    for c in clients[1:]:
        c.close()


@pytest.mark.parametrize("soft, clients", [(100, 50), (128, 64), (1024, 768)])
def test_default_limit_follows_the_descriptor_limit_less_a_reserve(start, soft, clients):
    p = start(DEMO, preexec_fn=soft_nofile(soft))
    seen = host_limit(p.client())
    if not WRAP:  # (valgrind keeps a few descriptors of the limit to itself)
        assert seen == soft
        assert default_max_clients(seen) == clients
    p.wait_for(r"open \(.*, at most %d clients\)" % default_max_clients(seen), stream="err")


def test_client_that_stops_reading_50_mb_pauses_only_itself(start):
    p = start(DEMO, "--timeout", "0")
    a = p.client()
    b = p.client()
    # a prints 50 MB (500,000 lines of 100 bytes; 5 MB under valgrind) and
    # never reads meanwhile
    lines = 50000 if WRAP else 500000
    max_output = 1 << 20  # the default
    a.send("for n_printed in range(%d): print('x' * 99)\n\n" % lines)
    # it gets as far as max_output (the line under way included) ...
    wait_true(lambda: b.cmd("'n_printed' in dir() and (n_printed + 1) * 100 >= %d"
                            % max_output) == "True\n", what="a at max_output")
    # ... while the others keep working: round trips, and statements that
    # print, sleep and print, each exactly its own
    for k in range(50):
        assert b.cmd("%d + 1" % k) == "%d\n" % (k + 1)
    others = [p.client() for _ in range(5)]
    for i, c in enumerate(others):
        c.send("import time; print('o%d'); time.sleep(0.02); print('o%d again')\n" % (i, i))
    for i, c in enumerate(others):
        assert c.read_until(PS1) == b"o%d\no%d again\n>>> " % (i, i)
    # ... and a's statement has not got further than its output can wait
    # for it: paused, not finished, its backlog bounded
    printed = int(b.cmd("n_printed"))
    assert printed < lines - 1
    assert printed * 100 < max_output + (4 << 20)
    # a reads: every byte arrives, in order, then the prompt
    expected = b"x" * 99 + b"\n"
    assert a.read_until(PS2) == PS2  # the loop's continuation prompt first
    got = bytearray()
    total = lines * len(expected)
    while len(got) < total + len(PS1):
        if not a._fill(time.monotonic() + TIMEOUT):
            break
        got += a.buf
        a.buf.clear()
    assert len(got) == total + len(PS1)
    assert got[-len(PS1):] == PS1
    assert got[:total] == expected * lines
    assert b.cmd("n_printed") == "%d\n" % (lines - 1)


def test_output_printed_before_a_statement_blocks_reaches_the_client_meanwhile(start):
    p = start(DEMO, "--timeout", "0")
    a = p.client()
    b = p.client()
    assert b.cmd("go = False") == ""
    a.send("import time\n")
    a.read_until(PS1)
    # a's statement waits for b: it can only end after a has seen 'first'
    a.send("print('first'); exec('while not go: time.sleep(0.001)'); print('second')\n")
    assert a.read_until("first\n") == b"first\n"
    assert b.cmd("go = True") == ""
    assert a.read_until(PS1) == b"second\n>>> "


def test_output_order_kept_when_a_statement_prints_sleeps_and_prints(start):
    p = start(DEMO)
    c = p.client()
    assert c.cmd("import time") == ""
    assert c.cmd("print('a'); time.sleep(0.05); print('b')") == "a\nb\n"
    # many small writes across sleeps of a few milliseconds each
    out = c.block(["for i in range(40):",
                   "    print('line', i, end='\\n' if i % 3 else '')",
                   "    time.sleep(0.002 * (i % 4))"])
    want = "".join("line %d%s" % (i, "\n" if i % 3 else "") for i in range(40))
    assert out == "... " * 3 + want  # (block() keeps the continuation prompts)
    # statements sent in one go: their outputs and prompts in order
    c.send("".join("print(%d)\n" % i for i in range(200)))
    got = b"".join(c.read_until(PS1) for _ in range(200))
    assert got == b"".join(b"%d\n>>> " % i for i in range(200))


def test_many_clients_printing_sleeping_and_printing_each_get_their_bytes_in_order(start):
    p = start(DEMO)
    clients = [p.client() for _ in range(100)]
    for i, c in enumerate(clients):
        c.send("import time\nfor k%d in range(3):\n"
               "    print('c%d', k%d); time.sleep(0.01); print('c%d', k%d, 'done')\n\n" % (i, i, i, i, i))
    for i, c in enumerate(clients):
        c.read_until(PS1)  # import
        c.read_until(PS2)
        c.read_until(PS2)
        out = c.read_until(PS1).decode()
        assert out == "".join("c%d %d\nc%d %d done\n" % (i, k, i, k) for k in range(3)) + ">>> "
    for c in clients:
        c.close()


def test_clients_hanging_up_as_their_output_is_sent_leave_the_server_healthy(start):
    p = start(DEMO)
    for round_ in range(5):
        socks = []
        for i in range(40):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(TIMEOUT)
            s.connect(p.unix_path)
            s.sendall(b"print('bye %d')\n" % i)
            socks.append(s)
        for s in socks:
            s.close()  # without reading: the answer may be on its way
        # and others that half-close right after their line get all of it
        halves = []
        for i in range(40):
            c = p.client()
            c.send("print('half %d')\n" % i)
            c.shutdown_write()
            halves.append(c)
        for i, c in enumerate(halves):
            assert c.read_all() == b"half %d\n>>> " % i
            c.close()
    c = p.client()
    assert c.cmd("'still serving'") == "'still serving'\n"
    wait_true(lambda: c.cmd("1") == "1\n" and p.err.count("closed") >= 400,
              what="every client closed")
