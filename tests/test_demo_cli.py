"""The demo as a program: options, listening lines, socket paths, signals."""
import os
import signal
import socket
import stat
import subprocess

import pytest

from conftest import DEMO, REPORT, TIMEOUT, WRAP, Client, Proc


def run_demo(*args, **kw):
    r = subprocess.run(WRAP + [str(DEMO)] + [str(a) for a in args], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=TIMEOUT, **kw)
    assert not REPORT.search(r.stderr.decode(errors="replace")), r.stderr.decode()
    return r


def test_help_prints_usage():
    r = run_demo("--help")
    assert r.returncode == 0
    for opt in ["--path", "--port", "--host", "--banner", "--no-banner", "--threaded",
                "--no-threaded", "--timeout", "--shared", "--no-shared", "--help",
                "--secret-file", "--tcp-insecure", "--idle-timeout"]:
        assert opt in r.stdout.decode()


def usage_error(*args):
    """Run the demo with bad arguments: exit 2, one line naming the problem
    then the usage on stderr, nothing on stdout. Returns the first line."""
    r = run_demo(*args)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert r.stdout == b""
    first, _, rest = err.partition("\n")
    assert first.startswith("manhole-demo: ")
    assert rest.startswith("usage: manhole-demo [options]\n")
    return first


@pytest.mark.parametrize("args,says", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--bogus=1"], "unknown option '--bogus=1'"),
    (["-x"], "unknown option '-x'"),
    (["--port", "x"], "--port: 'x' is not a port number"),
    (["--port", "70000"], "--port: '70000' is not a port number"),
    (["--port", "1e3"], "--port: '1e3' is not a port number"),
    (["--mode", "999"], "--mode: '999' is not an octal mode"),
    (["--max-clients", "0"], "--max-clients: '0'"),
    (["--max-clients", "-1"], "--max-clients: '-1'"),
    (["--max-line", "nan"], "--max-line: 'nan'"),
    (["--max-output", "1e300"], "--max-output: '1e300'"),
    (["extra-argument"], "unexpected argument 'extra-argument'"),
    (["--t"], "ambiguous option '--t'"),
    (["--quiet=1"], "option '--quiet' takes no argument"),
    (["--secret-file", ""], "--secret-file: the path is empty"),
    (["--path", "", "--no-banner"], "nothing to listen on"),
])
def test_bad_option_is_named_with_usage_and_exit_2(args, says):
    assert says in usage_error(*args)


@pytest.mark.parametrize("opt", ["--timeout", "--idle-timeout", "--port", "--path",
                                 "--secret-file", "--max-line"])
def test_missing_argument_names_the_option(opt):
    assert usage_error(opt) == "manhole-demo: option '%s' needs an argument" % opt


def test_missing_argument_of_an_abbreviated_option_names_the_option():
    assert usage_error("--idle") == "manhole-demo: option '--idle-timeout' needs an argument"


@pytest.mark.parametrize("opt", ["--timeout", "--idle-timeout"])
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "infinity", "-1", "-0.5",
                                   "1000000.5", "1e7", "1e300", "", "5s", "0x"])
def test_seconds_options_refuse_nonfinite_negative_and_absurd(opt, value):
    """nan, inf, negative and absurd (> 1e6 s) values are usage errors
    naming the option (--idle-timeout nan used to close every client at
    once)."""
    assert usage_error(opt, value) == \
        "manhole-demo: %s: '%s' is not a number of seconds from 0 to 1000000" % (opt, value)


def test_seconds_options_accept_the_bounds(start):
    p = start(DEMO, "--timeout", "1000000", "--idle-timeout=0")
    assert p.client().cmd("1 + 1") == "2\n"
    q = start(DEMO, "--timeout=0", "--idle-timeout", "1e6", "--path", str(p.unix_path) + "2")
    assert q.client().cmd("2 + 2") == "4\n"


def test_unambiguous_prefix_is_accepted(start):
    p = start(DEMO, "--no-ban", "--time", "2")
    assert p.client().greeting == b">>> "


@pytest.mark.parametrize("n", [0, 3, 255])
def test_demo_exits_with_the_sys_exit_status(start, n):
    p = start(DEMO)
    c = p.client()
    c.send("import sys; sys.exit(%d)\n" % n)
    assert c.read_all() == b""
    assert p.wait() == n


def test_tcp_insecure_lets_a_tcp_client_in_without_a_secret(start):
    p = start(DEMO, "--port", "0", "--tcp-insecure", path=False)
    assert Client.tcp(p.tcp_port).cmd("1 + 1") == "2\n"


def test_secret_file_is_written_where_asked_readable_only_by_owner(start, sockdir):
    path = sockdir / "tcp.secret"
    start(DEMO, "--port", "0", "--secret-file", str(path), path=False)
    if not path.exists():
        pytest.skip("this library does not write a TCP secret yet (issue 8)")
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert path.read_bytes().strip()


def test_listening_lines_for_unix_and_tcp(start, sockdir):
    p = start(DEMO, "--port", "0")
    assert p.out.splitlines()[:2] == ["listening on unix:%s" % (sockdir / "s"),
                                      "listening on tcp:127.0.0.1:%d" % p.tcp_port]


def test_banner_options(start, sockdir):
    p = start(DEMO, "--banner", "Hello there")
    assert p.client().greeting == b"Hello there\n>>> "
    q = start(DEMO, "--no-banner", "--path", str(sockdir / "t"))
    assert q.client().greeting == b">>> "


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_exits_zero(start, sig):
    p = start(DEMO)
    p.client().cmd("1")
    p.signal(sig)
    assert p.wait() == 0


def test_socket_file_left_in_place_at_exit(start, sockdir):
    p = start(DEMO)
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
    assert stat.S_ISSOCK(os.lstat(sockdir / "s").st_mode)


def test_stale_socket_is_replaced(start, sockdir):
    path = str(sockdir / "s")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # a socket file nobody listens on
    p = start(DEMO)
    assert p.client().cmd("1 + 1") == "2\n"
    assert "replaced stale socket" in p.err


def test_stale_socket_left_by_killed_demo_is_replaced(start, sockdir):
    p = start(DEMO)
    p.signal(signal.SIGKILL)
    p.wait()
    q = start(DEMO)
    assert q.client().cmd("2 + 2") == "4\n"


def test_live_socket_path_refused(start, sockdir):
    start(DEMO)
    r = run_demo("--path", sockdir / "s")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.count("\n") == 1
    assert str(sockdir / "s") in err and "already listening" in err


def test_regular_file_at_path_refused(sockdir):
    path = sockdir / "s"
    path.write_text("precious")
    r = run_demo("--path", path)
    assert r.returncode == 1
    assert str(path) in r.stderr.decode() and "regular file" in r.stderr.decode()
    assert path.read_text() == "precious"


def test_path_too_long_refused(sockdir):
    path = str(sockdir / ("x" * 120))
    r = run_demo("--path", path)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.count("\n") == 1 and path in err and "too long" in err


def test_missing_directory_refused(sockdir):
    path = str(sockdir / "nodir" / "s")
    r = run_demo("--path", path)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.count("\n") == 1 and path in err and "No such file or directory" in err


def test_permission_problem_refused(sockdir):
    d = sockdir / "locked"
    d.mkdir()
    path = str(d / "s")
    if os.geteuid() == 0:
        os.chmod(d, 0o755)  # root-owned: nobody may not create files in it
        r = run_demo("--path", path, preexec_fn=lambda: os.setuid(65534))
        if r.returncode == 127 and b"error while loading shared libraries" in r.stderr:
            # make check-pythons: a pyenv libpython under root's private home
            pytest.skip("nobody cannot load this build's libpython")
    else:
        os.chmod(d, 0o555)
        r = run_demo("--path", path)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.count("\n") == 1 and path in err and "Permission denied" in err


def test_defaults_match_the_quick_example():
    """No arguments: /var/tmp/testing.manhole, the banner, threaded,
    shared, 5 s (unless something already listens there)."""
    path = "/var/tmp/testing.manhole"
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
        pytest.skip("a live manhole already listens at %s" % path)
    except OSError:
        pass
    finally:
        probe.close()
    p = Proc([DEMO])
    try:
        assert p.unix_path == path
        c = p.client()
        assert c.greeting == b"Well this is neat\n>>> "
        c.cmd("v = 1")
        d = p.client()
        assert d.cmd("v") == "1\n"  # shared
        assert d.cmd("import threading; threading.current_thread() is threading.main_thread()") == "False\n"
        assert "timeout 5 s" in p.err
    finally:
        p.stop()


def test_port_alone_listens_on_tcp_only(start):
    p = start(DEMO, "--port", "0", path=False)
    assert "listening on unix:" not in p.out
    assert Client.tcp(p.tcp_port).cmd("1 + 1") == "2\n"


@pytest.mark.skipif(bool(WRAP), reason="valgrind keeps the descriptor limit down")
def test_demo_started_with_1100_files_open_still_serves(start, sockdir):
    """Its listener lands above FD_SETSIZE: the demo's select() loop cannot
    watch it, so the demo says so once and carries on with poll()."""
    # descriptors 3..1102 taken right before exec, so the demo's own land
    # above 1024
    script = 'ulimit -n 4096 && for i in $(seq 3 1102); do eval "exec $i</dev/null"; done && exec "$@"'
    p = start("bash", "-c", script, "bash", str(DEMO), "--path", str(sockdir / "s"), path=False)
    c = p.client()
    assert c.cmd("print('served')") == "served\n"
    assert c.cmd("import os; sorted(int(f) for f in os.listdir('/proc/self/fd'))[-1] > 1100") == "True\n"
    p.wait_for(r"using poll\(\) from now on", stream="err")  # (stderr is pumped apart)
