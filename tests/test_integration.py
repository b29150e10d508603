"""Installing, linking and embedding: the library as C programmers use it."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (BUILD, HOST, PORTABLE, PS1, PS2, ROOT, TEST_CFLAGS, TIMEOUT, Client,
                      Proc, needs_epoll, wait_true)

EXAMPLES = ["select-host", "poll-host",
            pytest.param("libevent-host", marks=needs_epoll),
            pytest.param("libuv-host", marks=needs_epoll)]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_host_real_session(start, sockdir, name):
    p = start(BUILD / "examples" / name, str(sockdir / "s"), "2", path=False)
    c = p.client()
    assert c.greeting == ("%s\n>>> " % name).encode()
    assert c.cmd("1 + 1") == "2\n"
    assert c.cmd("print('from', %r)" % name) == "from %s\n" % name
    # the host's own timer runs: its counter moves while we wait on it
    assert c.cmd("import time; s0 = seconds; time.sleep(1.2); seconds > s0") == "True\n"
    c.send("while True:\n    n = 1\n\n")
    c.read_until(PS2)
    c.read_until(PS2)
    assert c.read_until(PS1).startswith(b"TimeoutError")
    c.send("import sys; sys.exit(4)\n")
    assert c.read_all() == b""
    assert p.wait() == 4


def test_shared_library_exports_only_manhole_symbols():
    so = BUILD / "libmanhole.so"
    out = subprocess.run(["nm", "-D", "--defined-only", str(so)], stdout=subprocess.PIPE,
                         check=True).stdout.decode()
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    assert names, "no exported symbols?"
    assert all(n.startswith("manhole_") for n in names), [n for n in names if not n.startswith("manhole_")]
    assert "manhole_open" in names and "manhole_poll" in names


def test_soname_and_symlinks():
    out = subprocess.run(["readelf", "-d", str(BUILD / "libmanhole.so")], stdout=subprocess.PIPE,
                         check=True).stdout.decode()
    major = header_version()[0]
    assert "Library soname: [libmanhole.so.%d]" % major in out


def header_version():
    text = (ROOT / "manhole.h").read_text()
    get = lambda k: int(re.search(r"#define MANHOLE_VERSION_%s (\d+)" % k, text).group(1))
    return get("MAJOR"), get("MINOR"), get("PATCH")


def test_version_macros_runtime_call_pc_and_changes_agree(tmp_path):
    major, minor, patch = header_version()
    version = "%d.%d.%d" % (major, minor, patch)
    src = tmp_path / "v.c"
    src.write_text(
        '#include <stdio.h>\n#include "manhole.h"\n'
        "int main(void) {\n"
        '  printf("%s %s %d %d\\n", MANHOLE_VERSION_STRING, manhole_version(),\n'
        "         MANHOLE_VERSION_NUMBER, manhole_version_number());\n"
        "  return MANHOLE_VERSION_NUMBER >= 0x000100 ? 0 : 1;\n}\n")
    exe = tmp_path / "v"
    libs = subprocess.run(["pkg-config", "--libs", "python3-embed"], stdout=subprocess.PIPE,
                          check=True).stdout.decode().split()
    subprocess.run(["cc"] + TEST_CFLAGS + ["-I", str(ROOT), str(src), str(BUILD / "libmanhole.a")] +
                   libs + ["-lpthread", "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], stdout=subprocess.PIPE, check=True).stdout.decode().split()
    number = (major << 16) | (minor << 8) | patch
    assert out == [version, version, str(number), str(number)]
    subprocess.run(["make", "-s", "-C", str(ROOT), "B=%s" % BUILD, "%s/manhole.pc" % BUILD], check=True)
    assert "Version: %s\n" % version in (BUILD / "manhole.pc").read_text()
    first = re.search(r"^## (\S+)", (ROOT / "CHANGES.md").read_text(), re.M).group(1)
    assert first == version


def test_install_then_build_a_host_with_pkg_config_only(tmp_path, sockdir):
    dest = tmp_path / "dest"
    make = ["make", "-s", "-C", str(ROOT), "B=%s" % BUILD, "DESTDIR=%s" % dest, "PREFIX=/usr/local"]
    subprocess.run(make + ["install"], check=True, stdout=subprocess.DEVNULL)
    usr = dest / "usr" / "local"
    major, minor, patch = header_version()
    version = "%d.%d.%d" % (major, minor, patch)
    for f in ["include/manhole.h", "lib/libmanhole.a", "lib/libmanhole.so.%s" % version,
              "lib/pkgconfig/manhole.pc", "bin/manhole-demo",
              "share/man/man3/manhole.3", "share/man/man1/manhole-demo.1"]:
        assert (usr / f).is_file(), f
    assert os.readlink(usr / "lib" / ("libmanhole.so.%d" % major)) == "libmanhole.so.%s" % version
    assert os.readlink(usr / "lib" / "libmanhole.so") == "libmanhole.so.%d" % major
    assert version in (usr / "share/man/man3/manhole.3").read_text().splitlines()[0]

    # A separate host, built with nothing but pkg-config.
    host = tmp_path / "myhost.c"
    host.write_text(r'''
#include <manhole.h>
#include <stdio.h>
static int hits;
int main(int argc, char **argv) {
    manhole_config cfg; manhole_config_init(&cfg);
    cfg.unix_path = argv[1]; cfg.banner = "installed";
    manhole *mh; char err[256];
    if (manhole_open(&mh, &cfg, err, sizeof err)) { fprintf(stderr, "%s\n", err); return 1; }
    manhole_bind(mh, "hits", MANHOLE_INT, &hits, MANHOLE_WRITABLE);
    printf("listening on unix:%s\n", argv[1]); fflush(stdout);
    while (manhole_poll(mh, 1000) != MANHOLE_EXIT)
        ;
    int status = manhole_exit_status(mh);
    printf("hits=%d\n", hits);
    manhole_close(mh);
    return status;
}
''')
    env = dict(os.environ, PKG_CONFIG_PATH=str(usr / "lib" / "pkgconfig"),
               PKG_CONFIG_SYSROOT_DIR=str(dest))
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "manhole"], env=env,
                           stdout=subprocess.PIPE, check=True).stdout.decode().split()
    exe = tmp_path / "myhost"
    subprocess.run(["cc"] + TEST_CFLAGS + [str(host), "-o", str(exe)] + flags, check=True)
    # (after the installed library: the embedded CPython's own, if any)
    libs = [str(usr / "lib")] + os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    p = Proc([exe, sockdir / "s"], env={"LD_LIBRARY_PATH": os.pathsep.join(filter(None, libs))})
    try:
        c = p.client()
        assert c.greeting == b"installed\n>>> "
        assert c.cmd("hits = 41; hits + 1") == "42\n"
        c.send("raise SystemExit\n")
        c.read_all()
        assert p.wait() == 0
        assert "hits=41" in p.out
    finally:
        p.stop()
    ldd = subprocess.run(["ldd", str(exe)], env={"LD_LIBRARY_PATH": str(usr / "lib")},
                         stdout=subprocess.PIPE).stdout.decode()
    assert str(usr / "lib" / ("libmanhole.so.%d" % major)) in ldd

    subprocess.run(make + ["uninstall"], check=True, stdout=subprocess.DEVNULL)
    left = [str(f) for f in usr.rglob("*") if f.is_file() or f.is_symlink()]
    assert left == []


def test_python_host_keeps_its_interpreter(start):
    """A host that runs Python itself: the library joins its interpreter
    (never initializes or finalizes it) and the host's Python goes on."""
    p = start(HOST, "--python", "--loop", "poll", "--shared")
    c = p.client()
    assert c.cmd("host_data") == "{'answer': 42}\n"
    # the host's own Python runs between loop turns
    out = c.cmd("import time; a = host_main['host_counter']; time.sleep(0.5); host_main['host_counter'] > a")
    assert out == "True\n"
    assert c.cmd("add(2, 3)") == "5\n"
    out = c.cmd("stacks()")
    assert "Thread 'host-python-thread'" in out and "_host_loop" in out
    assert "manhole worker" in out
    assert p.stop() == 0
    assert "host python alive after close: True True" in p.out


def test_stacks_labels_threads_by_name(demo):
    c = demo.client()
    c.cmd("import threading, time; ev = threading.Event()")
    c.cmd("t = threading.Thread(target=ev.wait, name='named-by-the-repl'); t.start()")
    out = c.cmd("stacks()")
    assert "Thread 'named-by-the-repl'" in out and "in wait" in out
    assert "manhole worker" in out and "(running stacks())" in out
    # the demo's C main thread runs no Python, and is listed as such
    assert "Thread 'MainThread, manhole host thread'" in out
    assert "(no Python code running)" in out
    # the caller's stack, without stacks() itself
    assert 'File "<stdin>", line 1, in <module>' in out and "in stacks" not in out
    c.cmd("ev.set(); t.join()")


def test_install_with_prefix_writes_pc_for_that_prefix(tmp_path):
    """make install PREFIX=X: pkg-config then points into X (the .pc is
    written for the prefix of this install, whatever was built before)."""
    prefix = tmp_path / "prefix"
    make = ["make", "-s", "-C", str(ROOT), "B=%s" % BUILD, "PREFIX=%s" % prefix]
    subprocess.run(make + ["install"], check=True, stdout=subprocess.DEVNULL)
    env = dict(os.environ, PKG_CONFIG_PATH=str(prefix / "lib" / "pkgconfig"))
    out = subprocess.run(["pkg-config", "--cflags", "--libs", "manhole"], env=env,
                         stdout=subprocess.PIPE, check=True).stdout.decode()
    assert "-I%s/include" % prefix in out and "-L%s/lib" % prefix in out
    subprocess.run(make + ["uninstall"], check=True, stdout=subprocess.DEVNULL)
