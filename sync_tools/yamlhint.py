"""YAML syntax errors as a person can fix them: where (line and column) and the usual cause."""

from __future__ import annotations

from typing import Any

# (words in PyYAML's problem, the hint); the first that matches is given
_HINTS: tuple[tuple[str, str], ...] = (
    ("unknown escape character", "in \"double quotes\" a backslash starts an escape: write a regex such as "
                                 "^v\\d+ in 'single quotes' (or unquoted)"),
    ("found character '\\t'", "indent with spaces: YAML does not allow tabs"),
    ("mapping values are not allowed here", "a value that contains ': ' needs quotes; or this key is indented "
                                            "deeper than its siblings"),
    ("expected <block end>", "check the indentation of this line and the one above: the keys of one mapping "
                             "start in the same column"),
    ("could not find expected ':'", "a key needs ': ' after it; or a quoted value is not closed"),
    ("expected ',' or ']'", "a [ list is not closed with ]"),
    ("expected ',' or '}'", "a { mapping is not closed with }"),
    ("found unexpected end of stream", "a quoted value is not closed"),
    ("found undefined alias", "a *name refers to no &name anchor; quote the value if it starts with *"),
    ("cannot start any token", "quote the value: it starts with a character YAML reserves (@ or `)"),
)


def describe(e: Any) -> tuple[str, int | None]:
    """The one-line message and the 1-based line of PyYAML error *e*."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f" (column {mark.column + 1})" if mark is not None else ""
    hint = next((h for words, h in _HINTS if words in problem), None)
    message = f"invalid YAML{where}: {problem}" + (f": {hint}" if hint else "")
    return message, (mark.line + 1 if mark is not None else None)
