"""The manual pages keep up with the code: every public call, type, config
field and constant of manhole.h is in manhole(3), every option of
`manhole-demo --help` is in manhole-demo(1) (and nothing more), every
option's default reads the same in `--help`, the man page and the README
(for manhole-demo and manhole-cli), the pages carry manhole.h's version as
written in the tree, once installed `man manhole_open` (and every other
public name) finds manhole(3), a program built with `pkg-config manhole`
against a custom PREFIX runs as it is, and the example commands of the
man pages and of the README's Clients section run as written."""
import os
import re
import shutil
import subprocess

import pytest

from conftest import BUILD, DEMO, ROOT, TEST_CFLAGS, TIMEOUT, default_secret_path

HEADER = (ROOT / "manhole.h").read_text()
MAN3 = ROOT / "man" / "manhole.3"
MAN1 = ROOT / "man" / "manhole-demo.1"
MAN1_CLI = ROOT / "man" / "manhole-cli.1"
CLI = BUILD / "cli" / "manhole-cli"
README = (ROOT / "README.md").read_text()
VERSION = re.search(r'^#define MANHOLE_VERSION_STRING "([^"]+)"', HEADER, re.M).group(1)


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
@pytest.mark.parametrize("page", ["manhole.3", "manhole-demo.1", "manhole-cli.1"])
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


# ---- Versions: the pages read right from the tree -------------------------

@pytest.mark.parametrize("page", ["manhole.3", "manhole-demo.1", "manhole-cli.1"])
def test_man_page_carries_the_headers_version(page):
    """`man ./man/PAGE` shows the real version, not a placeholder: the
    pages are installed as they are, so a version bump in manhole.h must
    bump them too."""
    src = (ROOT / "man" / page).read_text()
    th = re.match(r'\.TH \S+ \d \S+ "manhole ([^"]*)"', src)
    assert th, src.splitlines()[0]
    assert th.group(1) == VERSION, "%s says %s, manhole.h %s" % (page, th.group(1), VERSION)
    assert "@" not in re.sub(r"\\\(at|[\w.+-]+@[\w.-]+", "", src), "a placeholder left in %s" % page
    others = set(re.findall(r"(?<![\d.])\d+\.\d+\.\d+(?![\d.])", src)) - {VERSION}
    assert not others, "versions other than %s in %s: %s" % (VERSION, page, others)


# ---- Every option's default, in --help, the man page and the README -------

def roff_render(source):
    """Roff source as text lines, close enough to read options from: font
    macros joined as groff joins them (.IR a b -> ab), escapes resolved,
    `\\c` continuing the line; other requests become lines of their own
    (".TP", ".PP", ...) so callers can split on them."""
    out = []
    join = False
    for line in source.splitlines():
        if line.startswith('.\\"'):
            continue
        m = re.match(r"\.(B|I|BI|BR|IB|IR|RB|RI|SM)(?:\s+(.*))?$", line)
        if m:
            args = [a.group(1).replace('""', '"') if a.group(1) is not None else a.group(2)
                    for a in re.finditer(r'"((?:[^"]|"")*)"|(\S+)', m.group(2) or "")]
            text = (" " if len(m.group(1)) == 1 else "").join(args)
        elif line.startswith("."):
            out.append(line.split()[0])
            join = False
            continue
        else:
            text = line
        cont = text.endswith("\\c")
        text = text[:-2] if cont else text
        text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)
        for esc, ch in (("\\-", "-"), ("\\(aq", "'"), ("\\(lq", '"'), ("\\(rq", '"'),
                        ("\\(dq", '"'), ("\\&", ""), ("\\%", ""), ("\\ ", " "), ("\\e", "\\")):
            text = text.replace(esc, ch)
        if join and out:
            out[-1] += text
        else:
            out.append(text)
        join = cont
    return out


def man_option_entries(page):
    """{option: text} for each `.TP` entry of OPTIONS: the tag names the
    options (`--threaded, --no-threaded`), the body describes them. An
    entry naming several options whose body has one `, or ` clause per
    option gives each its clause."""
    lines = roff_render(section(page.read_text(), "OPTIONS"))
    entries = {}
    i = 0
    while i < len(lines):
        if lines[i] != ".TP":
            i += 1
            continue
        tag = lines[i + 1]
        j = i + 2
        body = []
        while j < len(lines) and lines[j] not in (".TP", ".PP", ".SH", ".SS"):
            if not lines[j].startswith("."):
                body.append(lines[j])
            j += 1
        i = j
        opts = re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", tag)
        text = " ".join(body)
        clauses = text.split(", or ")
        for k, o in enumerate(opts):
            entries[o] = clauses[k] if len(opts) > 1 and len(clauses) == len(opts) else text
    return entries


def help_option_entries(binary):
    """{option: text} from `PROGRAM --help`: an option's line and the more
    indented lines under it (a path cut at a line's end is joined back)."""
    r = subprocess.run([str(binary), "--help"], stdout=subprocess.PIPE, timeout=TIMEOUT)
    assert r.returncode == 0
    entries = {}
    current = None
    for line in r.stdout.decode().splitlines():
        indent = len(line) - len(line.lstrip())
        m = re.match(r" {1,8}(?:-\w, +)?(--[a-z][a-z-]*)(.*)", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2).strip()
        elif current and indent > 8 and not line.lstrip().startswith("-"):
            part = line.strip()
            sep = "" if part.startswith(".") or entries[current].endswith("/") else " "
            entries[current] += sep + part
        else:
            current = None
    return entries


def stated_default(text):
    """What a description says the default is: None when it names none;
    () for a bare "(default)" (this option is the default behaviour);
    else the values after "default", up to `;`, `)` or the sentence's end,
    as a tuple of the words that look like values (numbers, paths, $VARS,
    quoted strings, --options)."""
    if text is None:
        return None
    m = re.search(r"\bdefault\b:?(.*?)(?:;|\)|\.(?:\s|$)|$)", text.replace("`", ""), re.S | re.I)
    if not m:
        return None
    words = re.findall(r"'[^']*'|\"[^\"]*\"|[^\s,;()]+", m.group(1))
    values = []
    for w in words:
        if w[0] in "'\"":
            values.append(w[1:-1])
        elif re.search(r"[\d/$]", w) or w.startswith("--"):
            values.append(w.rstrip(":."))
    return tuple(values)


def readme_section(title):
    m = re.search(r"^## %s\n(.*?)(?=^## |\Z)" % re.escape(title), README, re.M | re.S)
    assert m, "no README section %s" % title
    return m.group(1)


def readme_defaults(title):
    """{option: text} for each "`--option ...` (... default ...)" of a
    README section."""
    text = re.sub(r"\s+", " ", readme_section(title))
    return {m.group(1): m.group(2) for m in
            re.finditer(r"`(--[a-z][a-z-]*)[^`]*`\s*\(([^)]*\bdefault\b[^)]*)\)", text)}


PROGRAMS = {
    "manhole-demo": (DEMO, MAN1, "The demo"),
    "manhole-cli": (CLI, MAN1_CLI, "Clients"),
}


def default_mismatches(program):
    binary, page, readme_title = PROGRAMS[program]
    helps = help_option_entries(binary)
    mans = man_option_entries(page)
    readme = readme_defaults(readme_title)
    bad = []
    for opt in sorted(set(helps) | set(mans)):
        want = stated_default(helps.get(opt))
        got = stated_default(mans.get(opt))
        if want != got:
            bad.append("%s: --help says %s, %s says %s" % (opt, want, page.name, got))
    for opt, text in sorted(readme.items()):
        if opt not in helps:
            bad.append("%s: in the README's %s with a default, not an option of %s"
                       % (opt, readme_title, program))
        elif stated_default(text) != stated_default(helps[opt]):
            bad.append("%s: --help says %s, the README's %s says %s"
                       % (opt, stated_default(helps[opt]), readme_title, stated_default(text)))
    return bad


def test_default_parsing_reads_what_is_there():
    """Guards the guards: the parsers find the options and read the
    defaults as a reader would."""
    demo_help = help_option_entries(DEMO)
    demo_man = man_option_entries(MAN1)
    assert len(demo_help) >= 20 and set(demo_help) == set(demo_man)
    for entries in (demo_help, demo_man):
        assert stated_default(entries["--timeout"]) == ("5",)
        assert stated_default(entries["--host"]) == ("127.0.0.1",)
        assert stated_default(entries["--banner"]) == ("Well this is neat",)
        assert stated_default(entries["--threaded"]) == ()
        assert stated_default(entries["--no-threaded"]) is None
        assert stated_default(entries["--port"]) is None
        assert stated_default(entries["--max-clients"])[0] == "3/4"
        assert stated_default(entries["--path"]) == ("/var/tmp/testing.manhole", "--port")
        assert len(stated_default(entries["--secret-file"])) == 2
    cli_help = help_option_entries(CLI)
    cli_man = man_option_entries(MAN1_CLI)
    assert {"--command", "--path", "--secret-file", "--timeout", "--list"} <= set(cli_help)
    assert set(cli_help) == set(cli_man)
    for entries in (cli_help, cli_man):
        assert stated_default(entries["--timeout"]) == ("5",)
        assert len(stated_default(entries["--secret-file"])) == 3
    assert stated_default("(default 64; 1 to 1000000)") == ("64",)
    assert stated_default("Default: the library's, /tmp/x.secret.") == ("/tmp/x.secret",)
    assert "--secret-file" in readme_defaults("The demo")


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_every_default_agrees_in_help_man_page_and_readme(program):
    bad = default_mismatches(program)
    assert not bad, "defaults that disagree:\n" + "\n".join(bad)


# ---- A custom PREFIX: pkg-config finds it, the program runs as built ------

def test_program_built_with_pkg_config_runs_from_a_custom_prefix(tmp_path):
    """`make install PREFIX=DIR`, then `cc prog.c $(pkg-config --cflags
    --libs manhole)` with PKG_CONFIG_PATH=DIR/lib/pkgconfig: the program
    runs without LD_LIBRARY_PATH and loads DIR's libmanhole (the .pc's
    Libs carry the rpath)."""
    prefix = tmp_path / "prefix"
    subprocess.run(["make", "-s", "-C", str(ROOT), "B=%s" % BUILD, "PREFIX=%s" % prefix,
                    "install"], check=True, stdout=subprocess.DEVNULL, timeout=TIMEOUT * 10)
    env = dict(os.environ)
    env["PKG_CONFIG_PATH"] = os.pathsep.join(
        [str(prefix / "lib" / "pkgconfig")] + [p for p in [env.get("PKG_CONFIG_PATH")] if p])
    assert str(prefix) not in env.get("LD_LIBRARY_PATH", "")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "manhole"], env=env, check=True,
                           stdout=subprocess.PIPE, timeout=TIMEOUT).stdout.decode().split()
    assert "-Wl,-rpath,%s" % (prefix / "lib") in flags, flags
    src = tmp_path / "prog.c"
    src.write_text('#include <stdio.h>\n#include <string.h>\n#include <manhole.h>\n'
                   'int main(void)\n{\n'
                   '    printf("%s\\n", manhole_version());\n'
                   '    return strcmp(manhole_version(), MANHOLE_VERSION_STRING) != 0;\n}\n')
    prog = tmp_path / "prog"
    subprocess.run(["cc"] + TEST_CFLAGS + ["-o", str(prog), str(src)] + flags, env=env,
                   check=True, timeout=TIMEOUT * 3)
    r = subprocess.run([str(prog)], stdout=subprocess.PIPE, env=env, timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout.decode() == VERSION + "\n"
    trace = subprocess.run([str(prog)], stdout=subprocess.PIPE, timeout=TIMEOUT,
                           env=dict(env, LD_TRACE_LOADED_OBJECTS="1")).stdout.decode()
    assert "=> %s/libmanhole.so." % (prefix / "lib") in trace, trace


# ---- Example commands run as written ----------------------------------------

# What an example needs that a test cannot give it: a process of the
# reader's (12345, myapp, fix.py, stats()), whichever demos happen to run
# (pidof, --list), the demo itself, a terminal (telnet pasting the secret).
PLACEHOLDERS = re.compile(r"12345|myapp|fix\.py|stats\(|pidof|--list|manhole-demo|telnet|^manhole-cli$")


def example_lines():
    """The shell lines of the EXAMPLES of manhole-demo(1) and manhole-cli(1)
    and of the code blocks of the README's Clients section."""
    lines = []
    for page in (MAN1, MAN1_CLI):
        verbatim = False
        for l in roff_render(section(page.read_text(), "EXAMPLES")):
            if l in (".nf", ".fi"):
                verbatim = l == ".nf"
            elif verbatim and l and not l.startswith("."):
                lines.append(l)
    clients = readme_section("Clients")
    lines += [re.sub(r"\s+#\s.*$", "", l[4:]).rstrip()
              for l in clients.splitlines() if l.startswith("    ") and not l.startswith("     ")]
    return lines


def runnable_examples():
    out = []
    for line in example_lines():
        if PLACEHOLDERS.search(line):
            continue
        if line.startswith("rlwrap") and not shutil.which("rlwrap"):
            continue
        if line not in out:
            out.append(line)
    return out


def test_example_lines_are_found():
    """Guards the next test: it really has the plain-tool examples."""
    lines = runnable_examples()
    assert any(l.startswith("nc -U") for l in lines)
    assert any(l.startswith("socat - UNIX-CONNECT:") for l in lines)
    assert any("nc -N -U" in l for l in lines)
    assert any("--secret-path 127.0.0.1:7000" in l and "| nc" in l for l in lines)
    assert any(re.match(r"manhole-cli 127\.0\.0\.1:7000$", l) for l in lines)
    assert not [l for l in example_lines() if "READLINE" in l]


@pytest.mark.parametrize("line", runnable_examples())
def test_example_command_runs_as_written(start, sockdir, line):
    """Each example command, against the demo on a temporary path and a
    free port instead of /var/tmp/testing.manhole and 7000, with
    `print(6*7)` then `exit()` on its standard input: it prints what the
    manhole answers and exits 0."""
    p = start(DEMO, "--port", "0")
    p.wait_for(r"listening on tcp:")
    p.wait_listening()
    cmd = line.replace("/var/tmp/testing.manhole", p.unix_path)
    cmd = re.sub(r"\b7000\b", str(p.tcp_port), cmd)
    cmd = re.sub(r"(?<![\w/-])manhole-cli\b", str(CLI), cmd)
    r = subprocess.run(["sh", "-c", cmd], input=b"print(6*7)\nexit()\n", stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=TIMEOUT)
    out = r.stdout.decode()
    assert r.returncode == 0, (cmd, out, r.stderr.decode())
    if "--secret-path" in line and "|" not in line:
        assert out == "%s\n" % default_secret_path(p.tcp_port), out
    elif "print(ticks)" in line:
        assert re.search(r"^(>>> )?\d+$", out, re.M), out
    else:
        assert re.search(r"^(>>> )?42$", out, re.M), (cmd, out)
