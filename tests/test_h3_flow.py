"""Issue 15 (hardening III), points 5, 6, 7 and 9: the flow of records and
statements.

5. An over-long (or malformed) subnegotiation is discarded whole, up to
   its IAC SE: its tail is never read as lines.
6. Statements waiting on their client (for room in its output, or for a
   line of input) do not hold the pool: other clients' statements,
   completions and hellos are answered meanwhile.
7. Records sent while a statement waits for input are never dropped: a
   hello is answered at once, a script runs after the statement.
9. Prompts (and the other texts the server caches, logs or trims) are
   never cut inside a UTF-8 character.

Real hosts, real sockets, raw telnet option-77 records; everything
synchronises on what the server sends, with deadlines.
"""
import threading

import pytest

from conftest import HOST, PS1, Client, Timeout
from session_util import (HELLO, IAC, SB, SE, OPT, ExtClient, Record, complete_request,
                          record, run_request)

NOP = 241


def raw_record(kind, payload):
    """IAC SB 77 <kind> <payload> IAC SE, payload as given (not escaped)."""
    return bytes([IAC, SB, OPT]) + kind + payload + bytes([IAC, SE])


def names_defined(client, *names):
    """Which of names exist in the client's namespace (a plain client)."""
    out = client.cmd("print(sorted(n for n in %r if n in dir()))" % (names,))
    return out.strip()


# ---- 5: over-long and malformed subnegotiations ---------------------------

MAX_LINE = 1000
TAIL = b"\nTAIL_RAN = 1\n"


def overlong_script():
    """A script record far past max_line (+64), with a doubled 0xFF in its
    over-long part and a statement with a side effect at its end."""
    body = b"big.py\nx = 1\n#" + b"y" * (MAX_LINE + 200) + b"\xff\xff" + b"z" * 10 + TAIL
    return raw_record(b"E", body)


def _splits():
    rec = overlong_script()
    ff = rec.index(b"\xff\xff", 4)
    return {
        "whole": None,
        "split-inside-IAC-IAC": ff + 1,     # ... IAC | IAC ...
        "split-inside-IAC-SE": len(rec) - 1,  # ... IAC | SE
    }


@pytest.mark.parametrize("split", list(_splits()))
def test_overlong_script_record_is_discarded_whole(start, split):
    h = start(HOST, "--max-line", str(MAX_LINE))
    c = ExtClient.unix(h.unix_path)
    rec = overlong_script()
    at = _splits()[split]
    probe = b"print('TAIL_RAN' in dir())\n"
    if at is None:
        c.send(rec)
    else:
        # The first part alone passes the limit, so the server reports it
        # and has read it before the rest is sent: the rest comes in a
        # later read.
        c.send(rec[:at])
    out, status, p = c.wait_prompt()
    assert status == "1", (out, status)
    assert "manhole: script longer than %d bytes; discarded" % MAX_LINE in out, out
    if at is not None:
        c.send(rec[at:])
    c.send(probe)
    out, status, p = c.wait_prompt()
    assert out == "False\n", out
    assert status == "0"
    assert bytes(c.parser.err).count(b"manhole:") == 1, bytes(c.parser.err)
    # nothing more came: the next statement's answer is the next one
    out, status, p = c.statement("print('next')")
    assert out == "next\n" and status == "0"


def test_overlong_record_of_another_type_is_discarded_whole(start):
    h = start(HOST, "--max-line", str(MAX_LINE))
    c = h.client()
    c.send(raw_record(b"I", b"a" * (MAX_LINE + 200) + b"\nTAIL2 = 1\n"))
    out = c.read_until(PS1).decode()
    assert out == "manhole: request 'I' longer than %d bytes; discarded\n>>> " % (MAX_LINE + 64), out
    assert names_defined(c, "TAIL2") == "[]"
    c.close()


def test_line_around_overlong_record_is_kept(start):
    """A record is no part of the line it interrupts: the line goes on
    after it, even when the record was too long."""
    h = start(HOST, "--max-line", str(MAX_LINE))
    c = h.client()
    c.send(b"print('ke" + overlong_script() + b"pt')\n")
    out = c.read_until(PS1).decode()
    assert "manhole: script longer than %d bytes; discarded" % MAX_LINE in out, out
    assert c.read_until(PS1).decode() == "kept\n>>> "
    assert names_defined(c, "TAIL_RAN") == "[]"
    c.close()


def test_malformed_record_is_discarded_up_to_its_end(start):
    """IAC <command> inside a record breaks it: the rest of it, up to its
    IAC SE, is dropped with it, never read as lines."""
    h = start(HOST)
    c = h.client()
    c.send(raw_record(b"E", b"f.py\nabc" + bytes([IAC, NOP]) + b"\nTAIL3 = 1\n"))
    out = c.read_until(PS1).decode()
    assert "manhole: malformed telnet subnegotiation (IAC 241 inside it)" in out, out
    assert names_defined(c, "TAIL3") == "[]"
    c.close()


def test_overlong_completion_request_gets_an_empty_answer(start):
    h = start(HOST, "--max-line", str(MAX_LINE))
    c = ExtClient.unix(h.unix_path)
    c.send(complete_request(7, "x" * (MAX_LINE + 200)))
    n, cands = c.completion_reply(7)
    assert (n, cands) == (0, [])
    out, status, p = c.statement("print(1)")
    assert out.endswith("1\n"), out


# ---- 6: statements waiting on their client hold no worker --------------------

def _blockers(h, n, statement, ready=None):
    """n clients whose statement waits on them (they never read, or never
    answer); returns them once each is known to have started."""
    bs = []
    for _ in range(n):
        b = h.client()
        b.send(statement + "\n")
        if ready:
            b.read_until(ready)
        bs.append(b)
    return bs


# How many other threads are inside a statement of a client (a <stdin>
# frame on their stack).
IN_STATEMENTS = ("import sys, threading, traceback; me = threading.get_ident(); "
                 "print(sum(1 for t, f in sys._current_frames().items() if t != me and "
                 "any(g.f_code.co_filename.startswith('<stdin>') "
                 "for g, _ in traceback.walk_stack(f))))")


def _others_served(h, nblocked):
    """Another client's statement, a new client's hello and a completion
    are all answered while nblocked statements still wait on their
    clients (they are still in their statements: counted)."""
    p = h.client()
    # every worker the pool may have is taken by a blocked statement (each
    # said it started), yet this runs
    assert p.cmd(IN_STATEMENTS) == "%d\n" % nblocked
    assert p.cmd("print(6 * 7)") == "42\n"
    e = ExtClient.unix(h.unix_path)  # its hello is answered
    n, cands = e.complete("pri")
    assert "print(" in cands, cands
    assert p.cmd(IN_STATEMENTS) == "%d\n" % nblocked  # still there
    p.close()
    e.close()


def test_statements_blocked_on_output_leave_workers_for_others(start):
    h = start(HOST, "--max-workers", "2", "--timeout", "0", "--max-output", "4096")
    bs = _blockers(h, 2, "print('started'); exec(\"while True: print('x' * 1000)\")",
                   ready=b"started\n")
    _others_served(h, 2)
    for b in bs:
        b.close()


def test_statements_waiting_for_input_leave_workers_for_others(start):
    h = start(HOST, "--max-workers", "2", "--timeout", "0")
    bs = _blockers(h, 3, "x = input('? ')", ready=b"? ")
    _others_served(h, 3)
    for b in bs:
        b.send("done\n")
        assert b.read_until(PS1) == PS1
        b.close()


def test_hello_and_completion_are_answered_while_every_worker_runs(start):
    """The only worker runs a statement that never ends: a hello and a
    completion do not wait behind it."""
    h = start(HOST, "--max-workers", "1", "--timeout", "0")
    b = h.client()
    b.send("exec('print(\"spinning\")\\nwhile True: pass')\n")
    b.read_until(b"spinning\n")
    e = ExtClient.unix(h.unix_path)
    n, cands = e.complete("pri")
    assert "print(" in cands, cands
    b.close()
    e.close()


# ---- 7: records sent while input() waits ------------------------------------

def test_hello_sent_while_input_waits_is_answered(start):
    h = start(HOST)
    c = ExtClient.unix(h.unix_path, hello=False)
    c.line("x = input('? ')")
    c.until_output("? ")
    c.send(HELLO)
    out, recs, hr = c.until("H")
    assert hr.payload == b"1" and recs == [], (out, recs)
    out, recs, w = c.until("W")  # still waiting for its line, now said so
    c.line("abc")
    out, status, p = c.wait_prompt()
    assert status == "0" and p.payload == b"1>>> ", (out, status, p)
    out, status, p = c.statement("print(x)")
    assert out == "abc\n"


@pytest.mark.parametrize("state", ["input", "pdb"])
def test_script_sent_while_input_waits_runs_after_the_statement(start, state):
    h = start(HOST)
    c = ExtClient.unix(h.unix_path)
    if state == "input":
        c.line("v = input()")
        c.until("W")
        c.send(run_request("s.py", "print('script saw', v)"))
        c.line("answer")
    else:
        c.line("import pdb; pdb.set_trace(); v = 'after pdb'")
        c.until("W")
        c.send(run_request("s.py", "print('script saw', v)"))
        c.line("c")
    out, status, p = c.wait_prompt()
    assert status == "0", (out, status)
    out, status, p = c.wait_prompt()
    assert out.endswith("script saw %s\n" % ("answer" if state == "input" else "after pdb")), out
    assert status == "0"


def test_hello_in_every_state_is_answered(start):
    """At a block's continuation prompt the reply's P record says so."""
    h = start(HOST)
    c = ExtClient.unix(h.unix_path, hello=False)
    c.line("if 1:")
    c.until_output("... ")
    c.send(HELLO)
    out, recs, hr = c.until("H")
    out, recs, p = c.until("P")
    assert p.payload == b"2... ", p
    out, status, p = c.statement("  y = 5")
    assert p.payload == b"2... ", p
    out, status, p = c.statement("")
    assert status == "0" and p.payload == b"1>>> ", (out, status, p)
    out, status, p = c.statement("print(y)")
    assert out == "5\n"


def test_unknown_request_is_answered_with_an_error(start):
    h = start(HOST)
    c = ExtClient.unix(h.unix_path)
    c.line("if 1:")
    c.until("P")
    c.send(record("Z", "whatever"))
    out, status, p = c.wait_prompt()  # said, and the same prompt again
    assert out == "manhole: unknown request 'Z'; ignored\n", out
    assert status is None and p.payload == b"2... ", (status, p)
    out, status, p = c.statement("  z = 3")
    out, status, p = c.statement("")
    assert status == "0"
    out, status, p = c.statement("print(z)")  # the block was not dropped
    assert out == "3\n"


# ---- 9: UTF-8 at every boundary ---------------------------------------------

PROMPT = "é" * 40 + " "


def test_prompt_after_timeout_is_not_cut_inside_a_character(start):
    h = start(HOST, "--timeout", "1")
    c = ExtClient.unix(h.unix_path)
    out, status, p = c.statement("import sys; sys.ps1 = %r" % PROMPT)
    assert p.payload == b"1" + PROMPT.encode()
    out, status, p = c.statement("exec('while True: pass')")
    assert "TimeoutError" in out and status == "1", (out, status)
    assert p.payload == b"1" + PROMPT.encode(), p
    # a new client's greeting and hello reply have it whole too
    g = Client.unix(h.unix_path, prompt=PROMPT.encode())
    assert g.greeting.endswith(PROMPT.encode())
    e = ExtClient.unix(h.unix_path)
    assert e.prompt.payload == b"1" + PROMPT.encode()


def test_long_prompt_is_cut_on_a_character_boundary(start):
    """A prompt longer than the cache keeps (4 KiB) is cut there, on a
    character boundary."""
    h = start(HOST, "--timeout", "1")
    c = ExtClient.unix(h.unix_path)
    c.statement("import sys; sys.ps1 = 'a' + 'é' * 5000")
    out, status, p = c.statement("exec('while True: pass')")
    text = p.payload[1:].decode("utf-8")  # strict: no lone byte
    assert text.startswith("aé") and 3000 < len(text.encode()) <= 4096, len(text)


def test_audit_log_is_not_cut_inside_a_character(start):
    h = start(HOST, "--audit")
    c = h.client()
    c.cmd("#" + "a" * 898 + "é" * 10)  # the 900th byte is inside an é
    c.cmd("print('logged')")
    h.wait_for(r"input: print\('logged'\)", stream="err")
    with h._cv:
        err = bytes(h._err)
    line = [l for l in err.split(b"\n") if b"input: #aaa" in l][0]
    line.decode("utf-8")  # strict
    assert line.endswith(b"a"), line[-20:]
