"""The ``--where`` filter language: a small hand-written parser to a pyarrow.compute expression (never eval).

Grammar (keywords case-insensitive)::

    expr       := or_expr
    or_expr    := and_expr ("OR" and_expr)*
    and_expr   := not_expr ("AND" not_expr)*
    not_expr   := "NOT" not_expr | "(" expr ")" | predicate
    predicate  := column op literal
                | column ["NOT"] "IN" "(" literal ("," literal)* ")"
                | column "IS" ["NOT"] "NULL"
                | column                       (a boolean column alone: its value is true)
    op         := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="
    column     := name ([A-Za-z_][A-Za-z0-9_.]*) | "double-quoted name"
    literal    := 'single-quoted string' ('' inside is a quote) | number | TRUE | FALSE

    lang = 'de' AND updated_at >= '2026-01-01'
    NOT (lang IN ('de', 'fr')) OR year > 2020

Literals are cast to the column's type (a date or timestamp column compares with '2026-01-01');
a comparison with a null value is false (SQL semantics). An unknown column, a malformed
expression or a literal that does not fit its column is a ConfigError that lists the columns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.core.errors import ConfigError

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<quoted>"(?:[^"]|"")+")
  | (?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),])
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
""", re.VERBOSE)
KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "NULL", "TRUE", "FALSE"}
OPS = {"=": "equal", "!=": "not_equal", "<>": "not_equal", "<": "less", "<=": "less_equal", ">": "greater",
       ">=": "greater_equal"}


@dataclass(frozen=True)
class _Tok:
    kind: str  # string | quoted | number | op | punct | name | kw | end
    text: str
    pos: int


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _Malformed(f"unexpected character {text[pos]!r}", pos)
        kind = m.lastgroup or ""
        if kind != "ws":
            tok = m.group()
            if kind == "name" and tok.upper() in KEYWORDS:
                out.append(_Tok("kw", tok.upper(), pos))
            else:
                out.append(_Tok(kind, tok, pos))
        pos = m.end()
    out.append(_Tok("end", "", len(text)))
    return out


class _Malformed(Exception):
    def __init__(self, what: str, pos: int):
        super().__init__(what)
        self.what, self.pos = what, pos


class _Parser:
    """Recursive descent over the tokens, building pyarrow.compute expressions as it goes."""

    def __init__(self, text: str, schema: Mapping[str, Any]):
        self.text, self.schema = text, schema
        self.toks = _tokens(text)
        self.i = 0
        self.used: set[str] = set()

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self, kind: str, text: str | None = None) -> _Tok:
        tok = self.peek()
        if tok.kind != kind or (text is not None and tok.text != text):
            want = text or kind
            got = tok.text or "the end"
            raise _Malformed(f"expected {want}, found {got!r}", tok.pos)
        self.i += 1
        return tok

    def accept(self, kind: str, text: str | None = None) -> bool:
        tok = self.peek()
        if tok.kind == kind and (text is None or tok.text == text):
            self.i += 1
            return True
        return False

    def parse(self) -> Any:
        expr = self.or_expr()
        self.take("end")
        return expr

    def or_expr(self) -> Any:
        expr = self.and_expr()
        while self.accept("kw", "OR"):
            expr = expr | self.and_expr()
        return expr

    def and_expr(self) -> Any:
        expr = self.not_expr()
        while self.accept("kw", "AND"):
            expr = expr & self.not_expr()
        return expr

    def not_expr(self) -> Any:
        if self.accept("kw", "NOT"):
            return ~self.not_expr()
        if self.accept("punct", "("):
            expr = self.or_expr()
            self.take("punct", ")")
            return expr
        return self.predicate()

    def column(self) -> tuple[str, Any]:
        tok = self.peek()
        if tok.kind == "name":
            name = tok.text
        elif tok.kind == "quoted":
            name = tok.text[1:-1].replace('""', '"')
        else:
            raise _Malformed(f"expected a column name, found {tok.text or 'the end'!r}", tok.pos)
        self.i += 1
        if name not in self.schema:
            raise ConfigError(f"--where names the unknown column {name!r}; available columns: "
                              f"{', '.join(sorted(self.schema))}")
        self.used.add(name)
        return name, self.schema[name]

    def predicate(self) -> Any:
        import pyarrow.compute as pc

        name, typ = self.column()
        field = pc.field(name)
        tok = self.peek()
        if tok.kind == "op":
            self.i += 1
            return getattr(pc, OPS[tok.text])(field, self.literal(name, typ))
        if self.accept("kw", "IS"):
            negate = self.accept("kw", "NOT")
            self.take("kw", "NULL")
            return ~pc.is_null(field) if negate else pc.is_null(field)
        import pyarrow as pa

        if pa.types.is_boolean(typ) and not (tok.kind == "kw" and tok.text in ("NOT", "IN")):
            return pc.equal(field, pa.scalar(True))
        negate = self.accept("kw", "NOT")
        self.take("kw", "IN")
        self.take("punct", "(")
        values = [self.literal(name, typ)]
        while self.accept("punct", ","):
            values.append(self.literal(name, typ))
        self.take("punct", ")")
        expr = pc.is_in(field, value_set=pa.array([v.as_py() for v in values], type=typ))
        return (~expr & pc.is_valid(field)) if negate else expr  # a null is in no list and out of none

    def literal(self, column: str, typ: Any) -> Any:
        import pyarrow as pa

        tok = self.peek()
        self.i += 1
        if tok.kind == "string":
            value: Any = tok.text[1:-1].replace("''", "'")
        elif tok.kind == "number":
            value = float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
        elif tok.kind == "kw" and tok.text in ("TRUE", "FALSE"):
            value = tok.text == "TRUE"
        else:
            raise _Malformed(f"expected a value ('text', a number, TRUE or FALSE), found {tok.text or 'the end'!r}",
                             tok.pos)
        try:
            return pa.scalar(value).cast(typ)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
            raise ConfigError(f"--where: {tok.text} does not fit column {column!r} of type {typ} "
                              f"({str(err).splitlines()[0][:120]}); available columns: "
                              + ", ".join(f"{n} ({t})" for n, t in sorted(self.schema.items()))) from None


@dataclass(frozen=True)
class Filter:
    """A parsed ``--where`` expression: the text, the pyarrow.compute expression and the columns it reads."""

    text: str
    expression: Any
    columns: tuple[str, ...]


def parse_where(text: str, schema: Mapping[str, Any]) -> Filter:
    """Parse ``text`` against ``schema`` (column -> pyarrow type); ConfigError naming the columns when it fails."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--where needs an expression such as \"lang = 'de'\"; available columns: "
                          f"{', '.join(sorted(schema))}")
    try:
        p = _Parser(text, schema)
        expr = p.parse()
    except _Malformed as err:
        raise ConfigError(f"--where {text!r} is malformed at position {err.pos}: {err.what}. Grammar: column op value "
                          "(= != < <= > >=), column [NOT] IN (v, ...), column IS [NOT] NULL, joined by AND/OR/NOT "
                          f"and parentheses; strings in single quotes. Available columns: "
                          f"{', '.join(sorted(schema))}") from None
    return Filter(text, expr, tuple(sorted(p.used)))
