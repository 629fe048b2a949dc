"""Line numbers for dotted keys.

tomlkit keeps comments and layout but not positions, so the lines that error
messages name come from this scan of the source. It understands what this
configuration uses: tables, arrays of tables, sub-tables of the latest array
element, plain and dotted keys, and multi-line strings and arrays whose inner
lines must not be taken for keys.
"""

import re
from collections import Counter

_ARRAY_HEADER = re.compile(r"^\s*\[\[\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]")
_TABLE_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]")
_KEY = re.compile(
    r"^\s*((?:[A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*')"
    r"(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*'))*)\s*=(.*)$"
)


def _parts(dotted: str) -> list[str]:
    return [part.strip().strip("\"'") for part in dotted.split(".")]


def locate_keys(text: str) -> dict[str, int]:
    """Map each table and key path (``llamacpp[1].model``) to its 1-based line."""
    lines: dict[str, int] = {}
    array_counts: Counter[str] = Counter()
    table = ""
    open_string: str | None = None
    bracket_depth = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if open_string is not None:
            if line.count(open_string) % 2 == 1:
                open_string = None
            continue
        if bracket_depth > 0:
            bracket_depth += _bracket_balance(line)
            continue
        header = _ARRAY_HEADER.match(line)
        if header:
            name = ".".join(_parts(header.group(1)))
            table = f"{name}[{array_counts[name]}]"
            array_counts[name] += 1
            lines.setdefault(table, number)
            continue
        header = _TABLE_HEADER.match(line)
        if header:
            parts = _parts(header.group(1))
            if parts[0] in array_counts:
                parts[0] = f"{parts[0]}[{array_counts[parts[0]] - 1}]"
            table = ".".join(parts)
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            path = ".".join(_parts(key.group(1)))
            lines.setdefault(f"{table}.{path}" if table else path, number)
            value = key.group(2)
            for quote in ('"""', "'''"):
                if value.count(quote) % 2 == 1:
                    open_string = quote
            if open_string is None:
                bracket_depth = max(0, _bracket_balance(value))
    return lines


def _bracket_balance(fragment: str) -> int:
    """Open minus closed brackets, ignoring those inside quotes and comments."""
    balance = 0
    quote: str | None = None
    for char in fragment:
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#":
            break
        elif char in "[{":
            balance += 1
        elif char in "]}":
            balance -= 1
    return balance


def line_of(lines: dict[str, int], key: str) -> int | None:
    """The line of ``key``, or of the nearest enclosing table that has one."""
    candidate = key
    while candidate:
        for spelling in (candidate, f"{candidate}[0]"):  # [[x]] written where [x] belongs
            if spelling in lines:
                return lines[spelling]
        if "." not in candidate:
            break
        candidate = candidate.rsplit(".", 1)[0]
    return None
