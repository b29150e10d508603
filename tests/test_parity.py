"""The manhole against the same CPython's `python3 -i`, line for line.

Each case is typed at a fresh prompt of both: a manhole-demo built for the
CPython under test (MANHOLE_BUILD_DIR) and that CPython's own interactive
loop (MANHOLE_ORACLE_PYTHON; see parity_util for how it is driven and why).
Prompts, results, tracebacks, syntax errors with their carets, "Did you
mean" hints and notes must be identical. Only this is normalised:
object addresses, and what python writes at end of input for a terminal
(a newline after the last prompt, and one more prompt after the block that
end of input closed). The demo's own names (ticks, demo_add, stacks, ...)
are in its namespace; no case looks at them.
"""
import pytest

from conftest import DEMO
from parity_util import addresses, eof_normalise, oracle_version, python_i

CASES = {
    # syntax errors, each at a fresh prompt
    "def_open_paren": "def f(:\n",
    "binary_op_missing_operand": "1 +\n",
    "if_without_colon": "if x\n",
    "class_without_name": "class\n",
    "double_star_without_operand": "f(**)\n",
    "return_outside_function": "return 5\n",
    "assign_twice": "x = = 2\n",
    "print_statement": "print 'hello'\n",
    "for_without_colon": "for i in range(3) print(i)\n",
    "unterminated_string": "'abc\n",
    "expected_indented_block": "if True:\nprint(1)\n",
    "unexpected_indent": "  1\n",
    "mismatched_brackets": "(1, 2]\n",
    "assign_to_true": "True = 1\n",
    "unparenthesized_generator": "f(a for a in b, c)\n",
    "conditional_without_else": "1 if 2\n",
    "future_braces": "from __future__ import braces\n",
    "unindent_mismatch": "def f():\n        x = 1\n    y = 2\n",
    "open_paren_at_end_of_input": "x = (1,\n",
    "open_block_at_end_of_input": "for i in range(2):\n    print(i)\n",
    "compile_warning": "1 is 1\n",
    # runtime errors
    "zero_division": "1/0\n",
    "name_error": "undefined_name\n",
    "name_error_did_you_mean": "pritn('x')\n",
    "attribute_error_did_you_mean": "import sys; sys.maxsiz\n",
    "error_in_function_defined_at_prompt": "def f():\n    return 1/0\n\nf()\n",
    "error_two_functions_deep": "def a():\n    return b()\n\ndef b():\n    return {}['missing']\n\na()\n",
    "error_in_method": "class A:\n    def m(self):\n        return self.nope\n\nA().m()\n",
    "chained_exception": "try:\n    1/0\nexcept Exception as e:\n    raise KeyError('k') from e\n\n",
    "exception_with_note": "e = ValueError('x')\nif hasattr(e, 'add_note'): e.add_note('a note')\n\nraise e\n",
    "module_not_found": "import no_such_module_here\n",
    "index_error_in_expression": "a = [1]; a[5] + 1\n",
    "unpack_error": "a, b = 1\n",
    "recursion_error": "def r():\n    return r()\n\nr()\n",
    "exec_runtime_error": "exec('1/0')\n",
    "eval_syntax_error": "eval('1 +')\n",
    "warning_at_prompt": "import warnings\nwarnings.warn('careful')\n",
    "error_in_block_after_output": "for i in range(2):\n    print(i)\n    1/0\n\n",
    "blank_and_comment_lines_then_error": "\n\n# a comment\nreturn 5\n",
    "error_in_second_line_of_block": "if True:\n    x = 1\n    y = = 2\n\n",
    "keyboard_interrupt": "raise KeyboardInterrupt\n",
    "traceback_module_in_user_code": (
        "import traceback\ntry:\n    1/0\nexcept Exception:\n    traceback.print_exc()\n\n"),
    "traceback_print_last": "1/0\nimport traceback; traceback.print_last()\n",
    "compile_error_at_run_time": "compile('return 1', 'elsewhere', 'exec')\n",
    # results and the namespace
    "results": "1 + 1\n'a' * 3\nNone\n_\nprint('x', 2)\n",
    "main_namespace_dunders": "[k for k in sorted(globals()) if k.startswith('__')]\n__name__\n",
    "class_defined_at_prompt_pickles": (
        "import pickle\nclass P:\n    pass\n\ntype(pickle.loads(pickle.dumps(P()))) is P\n"),
    "import_main_sees_session_names": "session_name = 42\nimport __main__\n__main__.session_name\n",
    "function_module_is_main": "def g(): pass\n\ng.__module__, g.__globals__ is globals()\n",
    "future_import_lasts": (
        "from __future__ import annotations\ndef f(x: undefined): pass\n\nf.__annotations__\n"),
    "prompts_follow_sys_ps1": "import sys; sys.ps1 = 'py> '; sys.ps2 = '.. '\nif 1:\n  2\n\n",
    "unicode": "print('h\u00e9llo \u2603')\n'\u00e9'\n",
    "sys_exit_ends_session": "import sys\nsys.exit(3)\nprint('not run')\n",
}


# Known, deliberate: the manhole compiles the block typed so far after every
# line (as code.InteractiveConsole does), python3 -i parses it once as it
# reads. A literal that draws a compile-time warning (an invalid escape such
# as '\d' is a SyntaxWarning from 3.12 on) in a statement that takes more
# than one compile is warned about twice. These say so, and fail (strict)
# the day it is fixed.
KNOWN = {
    "warning_then_syntax_error": "x = '\\d' +\n",
    "warning_in_block": "def f():\n    return '\\d'\n\nf()\n",
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_compile_warning_in_multi_compile_statement_shown_twice(start, tmp_path, name):
    text = KNOWN[name]
    want = addresses(eof_normalise(python_i(text, tmp_path)))
    got = addresses(manhole_transcript(start, tmp_path, text))
    if oracle_version() < (3, 12):  # a DeprecationWarning there: not shown
        assert got == want
        return
    warning = "<stdin>:%d: SyntaxWarning: invalid escape sequence '\\d'\n" % (
        2 if name == "warning_in_block" else 1)
    assert want.count(warning) == 1 and got.count(warning) == 2
    again = got.rindex(warning)
    assert got[:again] + got[again + len(warning):] == want


def manhole_transcript(start, cwd, text):
    p = start(DEMO, "--no-banner", cwd=str(cwd))
    c = p.client()
    c.send(text)
    c.shutdown_write()
    out = c.read_all().decode("utf-8", "replace")
    c.close()
    return c.greeting.decode() + out


@pytest.mark.parametrize("name", sorted(CASES))
def test_manhole_prints_what_python_i_prints(start, tmp_path, name):
    text = CASES[name]
    want = addresses(eof_normalise(python_i(text, tmp_path)))
    got = addresses(manhole_transcript(start, tmp_path, text))
    assert got == want, "python %s\n--- python -i:\n%s\n--- manhole:\n%s" % (
        ".".join(map(str, oracle_version())), want, got)


@pytest.mark.skipif(oracle_version() < (3, 13), reason="3.13+ keeps typed source in linecache")
def test_typed_source_of_one_off_statements_is_bounded_and_functions_keep_theirs(start, tmp_path):
    p = start(DEMO, "--no-banner", cwd=str(tmp_path))
    c = p.client()
    c.block(["def keep():", "    return 1/0"])
    for i in range(150):
        assert c.cmd("x = %d" % i) == ""
    count = "import linecache; sum(1 for k in linecache.cache if str(k).startswith('<stdin>-'))"
    # the function's statement, the last 100 one-off ones, and this one
    assert c.cmd(count) == "102\n"
    out = c.cmd("keep()")
    assert "    return 1/0\n" in out and out.endswith("ZeroDivisionError: division by zero\n")
