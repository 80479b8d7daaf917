"""Text and JSON from clients, read within bounds: every failure is an InputError naming the field.

Python's own readers fail on a client's bytes with errors that are not about input: `json.loads`
raises RecursionError on deep nesting, turns a 400-digit number into an int that later overflows a
float conversion (and spends quadratic time on longer ones), and decodes `"\\udfff"` -- or, from
bytes, the 3-byte encoding of a surrogate -- into a lone surrogate that no encoder takes, so the
request fails later (UnicodeEncodeError) wherever it is encoded: in a tokenizer, an error message,
a JSON response. Buggy clients that cut strings between the halves of a surrogate pair send exactly
that. Here JSON is parsed with integers past `MAX_INT_DIGITS` kept as digit counts, its values
counted and its nesting bounded, and every string (keys too) checked before anything else reads it.
"""

from __future__ import annotations

import json
import re

from qwen3vl_triton.errors import InputError

MAX_DEPTH = 32  # levels of arrays and objects; a chat request uses 6
MAX_INT_DIGITS = 20  # a uint64 has 20; a longer integer is out of every field's range
# arrays, objects and commas of one document: a chat request has tens to thousands; a body of
# "0,0,0,..." would otherwise parse to a list 8 bytes a value wide (a 64 MiB body: 256 MiB)
MAX_JSON_ITEMS = 1_000_000
_DEEP_SEGMENTS = 4  # a nesting error names the field by its path's first segments
_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:,]', re.S)  # JSON strings and punctuation


class HugeInteger:
    """An integer literal too long to be a value of any field: only its digit count is kept."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<a {self.digits}-digit integer>"


def _parse_int(literal: str):
    digits = len(literal) - literal.startswith("-")
    return HugeInteger(digits) if digits > MAX_INT_DIGITS else int(literal)


def short(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, for error messages (a client's value may be megabytes)."""
    text_ = repr(value)
    return text_ if len(text_) <= limit else f"{text_[:limit]}... ({len(text_)} characters)"


def text(value, name: str) -> str:
    """One string input of a Triton request (the Python backend hands them as bytes): UTF-8, strictly
    (the 3-byte encodings of surrogates are refused, as the codec refuses them)."""
    if isinstance(value, str):
        check_text(value, name)
        return value
    data = value if isinstance(value, (bytes, bytearray)) else bytes(value)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(name, _utf8_problem(data, exc)) from None


def _utf8_problem(data: bytes, exc: UnicodeDecodeError) -> str:
    at, lead = exc.start, data[exc.start:exc.start + 3]
    if len(lead) == 3 and lead[0] == 0xED and 0xA0 <= lead[1] <= 0xBF and 0x80 <= lead[2] <= 0xBF:
        code = 0xD000 | (lead[1] & 0x3F) << 6 | lead[2] & 0x3F  # the 3-byte form UTF-8 forbids for surrogates
        return (f"is not valid UTF-8: a lone surrogate (U+{code:04X}) is encoded at byte {at} (a string cut "
                "between the halves of a surrogate pair?)")
    return f"is not valid UTF-8 (byte {at}: {exc.reason})"


def check_text(value: str, name: str) -> None:
    """A str that every encoder takes: no lone surrogates."""
    problem = _text_problem(value)
    if problem:
        raise InputError(name, problem)


def _text_problem(value: str) -> str | None:
    if value.isascii():  # O(1) in CPython
        return None
    m = _SURROGATE.search(value)
    if m is None:
        return None
    return (f"contains a lone surrogate (U+{ord(m.group()):04X}) at character {m.start()}: not valid Unicode "
            "text (a string cut between the halves of a surrogate pair?)")


def _scalar_problem(value) -> str | None:
    if isinstance(value, str):
        return _text_problem(value)
    if isinstance(value, HugeInteger):
        return f"is a {value.digits}-digit integer, out of range (numbers here have at most {MAX_INT_DIGITS} digits)"
    return None


def decode(raw: bytes | bytearray, name: str = "", root: str | None = None) -> str:
    """JSON text as bytes -> str, strictly UTF-8 (RFC 8259); a bad byte is named by the field whose
    string holds it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        found = _string_at(raw, exc.start, name)
        if found is None:
            raise InputError(root or name or "request", _utf8_problem(raw, exc)) from None
        where, at = found
        problem = _utf8_problem(raw, exc).replace(f"byte {exc.start}", f"byte {at}")
        raise InputError(where or root or name or "request", problem) from None


def loads(raw: bytes | bytearray | str, name: str = "", root: str | None = None, max_depth: int = MAX_DEPTH):
    """JSON text from a client -> its value, checked by `check`. `name` prefixes the paths of nested
    fields ("" for a request body: `messages[0].content`); `root` names the whole document in errors
    about it (default: `name`, or "request")."""
    root = root or name or "request"
    if not isinstance(raw, str):
        raw = decode(raw, name, root)
    marks = (",", "[", "{")
    items = sum(raw.count(m) for m in marks)
    if items > MAX_JSON_ITEMS:
        raise InputError(root, f"has {items} JSON arrays, objects and commas, above the limit of {MAX_JSON_ITEMS}")
    try:
        value = json.loads(raw, parse_int=_parse_int)
    except RecursionError:
        raise InputError(_deep_path(raw, name, max_depth) or root,
                         f"is nested more than {max_depth} levels deep") from None
    except ValueError as exc:  # json.JSONDecodeError: it says where, and shows none of the input
        raise InputError(root, f"is not valid JSON: {exc}") from None
    check(value, name, root, max_depth)
    return value


def check(value, name: str = "", root: str | None = None, max_depth: int = MAX_DEPTH) -> None:
    """Refuse, naming the field, a value nested more than `max_depth` levels deep, a string or key with
    a lone surrogate, or a HugeInteger. Iterative, with memory in the depth only."""
    root = root or name or "request"

    def where(trail, keep=None):
        return _path(name, trail[:keep]) or root

    problem = _scalar_problem(value)
    if problem:
        raise InputError(root, problem)
    if not isinstance(value, (dict, list)):
        return
    trail, stack = [], [_children(value)]  # trail: the path of the container stack[-1] walks
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            if trail:
                trail.pop()
            continue
        key, segment, child = entry
        if key is not None and (problem := _text_problem(key)):
            raise InputError(f"{where(trail)} (a key)", problem)
        if isinstance(child, (dict, list)):
            if len(stack) >= max_depth:
                raise InputError(where(trail, _DEEP_SEGMENTS), f"is nested more than {max_depth} levels deep")
            trail.append(segment)
            stack.append(_children(child))
        elif problem := _scalar_problem(child):
            raise InputError(where([*trail, segment]), problem)


def _children(item):
    if isinstance(item, dict):
        for key, child in item.items():
            yield key, _key_segment(key), child
    else:
        for i, child in enumerate(item):
            yield None, f"[{i}]", child


def _key_segment(key: str) -> str:
    return f".{key}" if len(key) <= 40 else f".{key[:40]}..."


def _path(name: str, segments: list[str]) -> str:
    return (name + "".join(segments)).lstrip(".")


def _deep_path(raw, name: str, max_depth: int) -> str | None:
    """Where JSON text first nests more than `max_depth` levels deep (for a document json.loads could
    not parse for its depth)."""
    doc = raw if isinstance(raw, str) else bytes(raw).decode("latin-1")
    for m, levels, _ in _scan(doc):
        if m.group() in ("[", "{") and len(levels) > max_depth:
            return _path(name, [_level_segment(level) for level in levels[:_DEEP_SEGMENTS]])
    return None


def _string_at(raw: bytes | bytearray, offset: int, name: str) -> tuple[str, int] | None:
    """(path of the string that holds byte `offset` of JSON text, offset within it), if one does."""
    doc = bytes(raw).decode("latin-1")  # one character per byte: positions are byte offsets
    for m, levels, key in _scan(doc):
        if m.start() < offset < m.end() and m.group()[0] == '"':
            path = _path(name, [_level_segment(level) for level in levels])
            return (f"{path or 'request'} (a key)" if key else path), offset - m.start() - 1
        if m.start() > offset:
            break
    return None


def _scan(doc: str):
    """JSON text's strings and punctuation, each with the open arrays and objects ([kind, index or
    key] each, after the token) and whether a string is a key; from the tokens alone, so a document
    too deep or not UTF-8 can still be placed."""
    levels, last_string = [], ""
    for m in _TOKEN.finditer(doc):
        token = m.group()
        key = False
        if token in ("[", "{"):
            levels.append(["[", 0] if token == "[" else ["{", None])
        elif token in ("]", "}"):
            if levels:
                levels.pop()
        elif token == ",":
            if levels and levels[-1][0] == "[":
                levels[-1][1] += 1
        elif token == ":":
            if levels and levels[-1][0] == "{":
                levels[-1][1] = last_string
        else:
            try:
                last_string = json.loads(token)
            except ValueError:
                last_string = token[1:-1]
            if _text_problem(last_string):
                last_string = "?"
            key = doc[m.end():m.end() + 64].lstrip().startswith(":")
        yield m, levels, key


def _level_segment(level) -> str:
    kind, at = level
    if kind == "[":
        return f"[{at}]"
    return _key_segment(at) if at is not None else ""
