"""The manual pages keep up with the code: every public call, type, config
field and constant of manhole.h is in manhole(3), every option of
`manhole-demo --help` is in manhole-demo(1) (and nothing more), and once
installed, `man manhole_open` (and every other public name) finds
manhole(3)."""
import os
import re
import shutil
import subprocess

import pytest

from conftest import BUILD, DEMO, ROOT, TIMEOUT

HEADER = (ROOT / "manhole.h").read_text()
MAN3 = ROOT / "man" / "manhole.3"
MAN1 = ROOT / "man" / "manhole-demo.1"


def strip_c_comments(text):
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)


def struct_fields(typedef_name):
    """Field names of `typedef struct NAME { ... } NAME;` in manhole.h."""
    m = re.search(r"typedef struct %s \{(.*?)\} %s;" % (typedef_name, typedef_name), HEADER, re.S)
    assert m, typedef_name
    decls = [d.strip() for d in strip_c_comments(m.group(1)).split(";") if d.strip()]
    return [re.search(r"(\w+)\s*(\[[^\]]*\])?$", d).group(1) for d in decls]


PUBLIC_CALLS = sorted(set(re.findall(r"MANHOLE_API\s+[^;(]*?\b(manhole_\w+)\s*\(", HEADER)))
PUBLIC_TYPES = sorted(set(re.findall(r"typedef\s+[^;]*?\b(manhole_\w+)\s*[;(]", HEADER)) |
                      set(re.findall(r"\}\s*(manhole_\w+)\s*;", HEADER)))
CONFIG_FIELDS = struct_fields("manhole_config")
VALUE_FIELDS = struct_fields("manhole_value")


def header_constants():
    names = set()
    for body in re.findall(r"enum\s*\{(.*?)\}", strip_c_comments(HEADER), re.S):
        for item in body.split(","):
            m = re.match(r"\s*(MANHOLE_\w+)", item)
            if m:
                names.add(m.group(1))
    names |= set(re.findall(r"^#define\s+(MANHOLE_\w+)", HEADER, re.M))
    return sorted(names - {"MANHOLE_H", "MANHOLE_API"})


CONSTANTS = header_constants()


def roff_text(source):
    """The words of a roff source: font changes and escapes dropped,
    `\\-` as `-`."""
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", source)
    text = text.replace("\\-", "-").replace("\\(aq", "'").replace("\\&", "").replace("\\c", "")
    return text


def section(source, title):
    """The roff source of section `.SH TITLE` up to the next `.SH`."""
    m = re.search(r"^\.SH \"?%s\"?\n(.*?)(?=^\.SH |\Z)" % re.escape(title), source, re.M | re.S)
    assert m, "no section %s" % title
    return m.group(1)


def has_word(text, word):
    return re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(word), text) is not None


def test_header_parsing_finds_the_api():
    """Guards the guards: the lists below are really the header's."""
    assert {"manhole_open", "manhole_wakeup", "manhole_def", "manhole_version"} <= set(PUBLIC_CALLS)
    assert len(PUBLIC_CALLS) >= 26
    assert {"manhole_config", "manhole_value", "manhole_fn", "manhole_log_fn"} <= set(PUBLIC_TYPES)
    assert {"unix_path", "worker_priority", "close_timeout", "tcp_secret", "tcp_secret_file",
            "tcp_insecure", "log", "struct_size"} <= set(CONFIG_FIELDS)
    assert VALUE_FIELDS == ["type", "i", "d", "s", "len"]
    assert {"MANHOLE_OK", "MANHOLE_ENOTFOUND", "MANHOLE_WORKERS_IDLE", "MANHOLE_LOG_AUDIT",
            "MANHOLE_BYTES", "MANHOLE_RAISE_KEY", "MANHOLE_ANY_THREAD",
            "MANHOLE_VERSION_NUMBER"} <= set(CONSTANTS)


def test_every_public_call_is_named_and_declared_in_manhole_3():
    src = MAN3.read_text()
    name = roff_text(section(src, "NAME"))
    synopsis = roff_text(section(src, "SYNOPSIS"))
    missing_name = [f for f in PUBLIC_CALLS if not has_word(name, f)]
    missing_synopsis = [f for f in PUBLIC_CALLS if not re.search(r"\b%s\(" % f, synopsis)]
    assert not missing_name, "not in NAME of manhole(3): %s" % missing_name
    assert not missing_synopsis, "not in SYNOPSIS of manhole(3): %s" % missing_synopsis


def test_every_public_call_is_described_in_manhole_3():
    desc = roff_text(section(MAN3.read_text(), "DESCRIPTION"))
    missing = [f for f in PUBLIC_CALLS if not has_word(desc, f)]
    assert not missing, "not described in manhole(3): %s" % missing


def test_every_public_type_is_named_in_manhole_3():
    name = roff_text(section(MAN3.read_text(), "NAME"))
    missing = [t for t in PUBLIC_TYPES if t != "manhole" and not has_word(name, t)]
    assert not missing, "not in NAME of manhole(3): %s" % missing


def test_every_config_field_has_an_entry_in_manhole_3():
    src = MAN3.read_text()
    missing = [f for f in CONFIG_FIELDS if not re.search(r"^\.TP\n\.I %s\n" % f, src, re.M)]
    assert not missing, "manhole_config fields without a .TP entry in manhole(3): %s" % missing


def test_every_manhole_value_field_is_in_the_synopsis():
    synopsis = roff_text(section(MAN3.read_text(), "SYNOPSIS"))
    missing = [f for f in VALUE_FIELDS if not re.search(r"\W%s;" % f, synopsis)]
    assert not missing, "manhole_value fields missing from manhole(3): %s" % missing


def test_every_constant_is_in_manhole_3():
    text = roff_text(MAN3.read_text())
    missing = [c for c in CONSTANTS if not has_word(text, c)]
    assert not missing, "MANHOLE_* constants missing from manhole(3): %s" % missing


def demo_help_options():
    r = subprocess.run([str(DEMO), "--help"], stdout=subprocess.PIPE, timeout=TIMEOUT)
    assert r.returncode == 0
    return sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", r.stdout.decode())))


def test_every_demo_option_is_in_manhole_demo_1():
    options = roff_text(section(MAN1.read_text(), "OPTIONS"))
    listed = demo_help_options()
    assert len(listed) >= 20
    missing = [o for o in listed if not has_word(options, o)]
    assert not missing, "in manhole-demo --help but not in manhole-demo(1): %s" % missing


def test_manhole_demo_1_documents_no_option_the_demo_lacks():
    options = roff_text(section(MAN1.read_text(), "OPTIONS"))
    items = re.findall(r"^\.TP\n(.*)$", options, re.M)  # the tag line of each entry
    documented = {o for line in items for o in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line)}
    assert documented
    extra = sorted(documented - set(demo_help_options()))
    assert not extra, "in manhole-demo(1) but not an option of the demo: %s" % extra


needs_man = pytest.mark.skipif(not shutil.which("man"), reason="man is not installed")


def man(*args, **kw):
    env = dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="100", LC_ALL="C.UTF-8")
    env.pop("MANPATH", None)
    return subprocess.run(["man"] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env, timeout=TIMEOUT, **kw)


@needs_man
@pytest.mark.parametrize("page", ["manhole.3", "manhole-demo.1"])
def test_man_page_renders_without_warnings(page):
    r = man("--warnings", "-l", str(ROOT / "man" / page))
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr.decode() == ""
    assert b"NAME" in r.stdout and b"SYNOPSIS" in r.stdout


@needs_man
def test_installed_man_manhole_open_finds_manhole_3(tmp_path):
    """make install writes a `.so` stub per public name: `man manhole_open`
    and every other public name find manhole(3), version filled in."""
    dest = tmp_path / "dest"
    subprocess.run(["make", "-s", "-C", str(ROOT), "B=%s" % BUILD, "DESTDIR=%s" % dest,
                    "PREFIX=/usr", "install"], check=True, stdout=subprocess.DEVNULL,
                   timeout=TIMEOUT * 10)
    mandir = dest / "usr" / "share" / "man"
    r = man("-M", str(mandir), "-w", "manhole_open")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().strip() == str(mandir / "man3" / "manhole.3")  # the stub resolved
    r = man("-M", str(mandir), "3", "manhole_open")
    assert r.returncode == 0, r.stderr.decode()
    page = r.stdout.decode()
    assert page.startswith("MANHOLE(3)")
    assert "manhole_open" in page and "LEAVING A SESSION" in page
    assert "@VERSION@" not in page
    version = re.search(r'MANHOLE_VERSION_STRING "([^"]+)"', HEADER).group(1)
    assert "manhole %s" % version in page
    stubs = sorted(p.stem for p in (mandir / "man3").glob("*.3") if p.name != "manhole.3")
    assert set(PUBLIC_CALLS) <= set(stubs)
    name = roff_text(section(MAN3.read_text(), "NAME"))
    assert [s for s in stubs if not has_word(name, s)] == []
    for stub in stubs:
        r = man("-M", str(mandir), "3", stub)
        assert r.returncode == 0 and r.stdout.decode().startswith("MANHOLE(3)"), stub
    r = man("-M", str(mandir), "1", "manhole-demo")
    assert r.returncode == 0 and "--secret-file" in r.stdout.decode()


def test_license_is_bsd_2_clause_and_said_in_readme_and_pc(tmp_path):
    """LICENSE, the README and the installed manhole.pc agree on the
    licence (a .pc has no License field: a comment line carries it)."""
    lic = (ROOT / "LICENSE").read_text()
    assert lic.startswith("BSD 2-Clause License\n")
    assert "Copyright (c) 2026 the manhole authors" in lic
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"BSD 2-Clause.*`LICENSE`|`LICENSE`.*BSD 2-Clause", readme)
    subprocess.run(["make", "-s", "-C", str(ROOT), "B=%s" % tmp_path, "%s/manhole.pc" % tmp_path],
                   check=True, timeout=TIMEOUT)
    pc = (tmp_path / "manhole.pc").read_text().splitlines()
    assert any(line.startswith("# License: BSD-2-Clause") for line in pc), pc
