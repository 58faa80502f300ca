"""The README's Python snippets run as written and print what the README shows.

Every ```python block of README.md runs on its own, in a fresh namespace (each
snippet is meant to be copied alone, so each does its own imports). What it
prints must be, line for line, the lines its ``print(f"...")  # ...`` comments
show (a comment that starts with the f-string's literal text), followed by the
plain ``` block right after the snippet, when there is one. A snippet followed
by neither must print nothing.
"""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# print(f"final loss {loss:.4f}")   # final loss 0.1102
_PRINT_COMMENT = re.compile(r"^\s*print\(f?([\"'])([^{\"'\\]*).*#\s*(.*?)\s*$")


def _snippets() -> list:
    text = README.read_text()
    fences = list(_FENCE.finditer(text))
    params = []
    for i, fence in enumerate(fences):
        if fence.group(1) != "python":
            continue
        output = None
        if i + 1 < len(fences):
            nxt = fences[i + 1]
            if nxt.group(1) == "" and not text[fence.end() : nxt.start()].strip():
                output = nxt.group(2)
        line = text.count("\n", 0, fence.start(2)) + 1
        params.append(pytest.param(fence.group(2), output, line, id=f"README.md:{line}"))
    return params


def _expected_lines(source: str, output: str | None) -> list[str]:
    lines = []
    for src_line in source.splitlines():
        m = _PRINT_COMMENT.match(src_line)
        if m and m.group(2) and m.group(3).startswith(m.group(2)):
            lines.append(m.group(3))
    if output is not None:
        lines += output.splitlines()
    return [ln.rstrip() for ln in lines]


def test_the_readme_has_snippets():
    snippets = _snippets()
    assert len(snippets) >= 3
    # Every snippet with a printed table is checked against it.
    assert sum(p.values[1] is not None for p in snippets) >= 3


@pytest.mark.parametrize(("source", "output", "line"), _snippets())
def test_readme_snippet(source: str, output: str | None, line: int):
    # Blank lines in front: a traceback points at the README's own line numbers.
    code = compile("\n" * (line - 1) + source, str(README), "exec")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(code, {"__name__": f"readme_line_{line}"})  # noqa: S102 - the README's code
    printed = [ln.rstrip() for ln in stdout.getvalue().splitlines()]
    assert printed == _expected_lines(source, output)
