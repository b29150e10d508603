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
                "--no-threaded", "--timeout", "--shared", "--no-shared", "--help"]:
        assert opt in r.stdout.decode()


@pytest.mark.parametrize("args", [["--bogus"], ["--port", "x"], ["--timeout", "-1"],
                                  ["--port", "70000"], ["extra-argument"]])
def test_bad_option_prints_usage_and_exits_2(args):
    r = run_demo(*args)
    assert r.returncode == 2
    assert r.stderr.decode().startswith("usage:")


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
    assert "using poll() from now on" in p.err
