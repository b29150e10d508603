"""The REPL oracle: the same CPython's own `python3 -i`, fed the same lines.

Which interpreter: MANHOLE_ORACLE_PYTHON (tools/check-pythons sets it to
the interpreter of the CPython each build embeds); unset, the interpreter
that matches the default embed, `pkg-config --variable=exec_prefix
python3-embed`/bin/python3.X.

How it is fed: `-i -q -u` with the lines on a pipe. That runs the C
interactive loop (PyRun_InteractiveLoop), the same tokenizer in interactive
mode and the same compiler as on a terminal; only the line editing is
missing, which a socket has no use for. Prompts go to stderr, results to
stdout, both unbuffered into one pipe, so they interleave as on a screen.
PYTHON_BASIC_REPL=1 keeps 3.13+ on that C loop even if it ever sees a
terminal: its new REPL (_pyrepl) is a Python program with its own editor,
colours and `<python-input-N>` filenames, not what an embedded loop
compares to. Environment variables that would change what python prints
(PYTHONSTARTUP, colours, warnings options, ...) are removed.
"""
import os
import re
import subprocess
import sys

from conftest import TIMEOUT

ORACLE_ENV = "MANHOLE_ORACLE_PYTHON"


def default_oracle():
    """The interpreter of the CPython that `make` embeds by default."""
    def pc(*args):
        r = subprocess.run(["pkg-config"] + list(args) + ["python3-embed"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return r.stdout.decode().strip() if r.returncode == 0 else ""
    prefix, version = pc("--variable=exec_prefix"), pc("--modversion")
    if prefix and version:
        path = os.path.join(prefix, "bin", "python" + version)
        if os.access(path, os.X_OK):
            return path
    return sys.executable


def oracle_python():
    return os.environ.get(ORACLE_ENV) or default_oracle()


def oracle_version():
    out = subprocess.run([oracle_python(), "-c", "import sys; print(sys.version_info[:3])"],
                         stdout=subprocess.PIPE, check=True, timeout=TIMEOUT).stdout
    return tuple(int(x) for x in re.findall(rb"\d+", out))


# Variables that change what `python3 -i` prints; the oracle runs without them.
_DROP = ("PYTHONSTARTUP", "PYTHONWARNINGS", "PYTHONDEVMODE", "PYTHONINSPECT",
         "PYTHONHOME", "PYTHONPATH", "PYTHONSAFEPATH", "PYTHONDONTWRITEBYTECODE",
         "PYTHON_COLORS", "FORCE_COLOR", "PYTHONASYNCIODEBUG", "PYTHONTRACEMALLOC",
         "PYTHONFAULTHANDLER", "PYTHONBREAKPOINT", "PYTHONOPTIMIZE", "PYTHONVERBOSE")


def python_i(text, cwd):
    """What `python3 -i` prints for this input: prompts, results, errors."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    env.update(PYTHON_BASIC_REPL="1", NO_COLOR="1", TERM="dumb", PYTHONUTF8="1",
               PYTHONIOENCODING="utf-8")
    r = subprocess.run([oracle_python(), "-i", "-q", "-u"], input=text.encode(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(cwd),
                       env=env, timeout=TIMEOUT)
    return r.stdout.decode("utf-8", "replace")


def eof_normalise(oracle):
    """What only a terminal needs: at end of input python writes a newline
    (the user's ^D left the cursor after a prompt) and, after running a
    block that end of input closed, one more prompt nobody can answer. The
    manhole sends neither: after its last prompt (or the output of the block
    that end of input closed) it closes the connection."""
    if oracle.endswith("\n"):  # (after sys.exit() python writes nothing)
        oracle = oracle[:-1]
    m = re.search(r"\.\.\. \n((?:(?!>>> |\.\.\. ).)*)>>> \Z", oracle, re.S)
    if m:  # the block open at end of input, its output, the last prompt
        oracle = oracle[:m.start()] + "... " + m.group(1)
    return oracle


def addresses(text):
    """Object addresses (0x7f...) differ between any two processes."""
    return re.sub(r"0x[0-9a-fA-F]+", "0x...", text)
