"""A real telnet client (netkit's, through a pseudo-terminal) against the
demo: Ctrl-C interrupts the running statement and the session goes on
(issue 8). telnet sends IAC IP and then IAC DO TIMING-MARK, and shows
nothing until the server answers the mark."""
import shutil

import pytest

from conftest import DEMO, TIMEOUT, default_secret_path, wait_true

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.skipif(not shutil.which("telnet"), reason="telnet is not installed")


def telnet(p, secret=True):
    t = pexpect.spawn("telnet", ["127.0.0.1", str(p.tcp_port)], timeout=TIMEOUT)
    if secret:
        t.sendline(default_secret_path(p.tcp_port).read_text().strip())
    t.expect(">>> ")
    return t


def test_telnet_ctrl_c_interrupts_while_true_and_keeps_the_session(start):
    p = start(DEMO, "--port", "0", "--timeout", "0")  # (a shared namespace)
    t = telnet(p)
    t.sendline("kept = 41 + 1")
    t.expect(">>> ")
    t.sendline("while True: spinning = True")
    t.expect(r"\.\.\. ")
    t.sendline("")
    # Another client sees the statement running before Ctrl-C is pressed.
    other = p.client()
    wait_true(lambda: other.cmd("'spinning' in dir()") == "True\n", what="statement running")
    t.sendcontrol("c")
    t.expect("KeyboardInterrupt\r\n>>> ")
    assert "Traceback (most recent call last)" in t.before.decode()
    t.sendline("kept")
    t.expect("42\r\n>>> ")
    t.sendline("exit()")
    t.expect(pexpect.EOF)
    assert p.p.poll() is None


def test_telnet_ctrl_c_at_prompt_drops_the_half_entered_block(start):
    p = start(DEMO, "--port", "0")
    t = telnet(p)
    t.sendline("if True:")
    t.expect(r"\.\.\. ")
    t.sendline("    half = 1")
    t.expect(r"\.\.\. ")
    t.sendcontrol("c")
    t.expect("KeyboardInterrupt\r\n>>> ")
    t.sendline("'half' in dir()")
    t.expect("False\r\n>>> ")


def test_telnet_without_the_secret_is_refused(start):
    p = start(DEMO, "--port", "0")
    t = pexpect.spawn("telnet", ["127.0.0.1", str(p.tcp_port)], timeout=TIMEOUT)
    t.sendline("not the secret")
    t.expect("manhole: authentication failed")
    t.expect(pexpect.EOF)
    assert ">>>" not in t.before.decode()
