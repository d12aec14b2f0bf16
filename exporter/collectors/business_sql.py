"""Load-time check of business SQL: PostgreSQL's lexical rules, enough to find its bare words."""

from __future__ import annotations

import re
import string

# This check gives early, friendly config errors; it is not what keeps business SQL read-only.
# That is the server's job (docs/business.md, "Execution"): each query is sent alone through
# the extended protocol, which refuses a second statement, as the body of a cursor, which
# refuses anything but a plain SELECT, on a session that is read-only from its start packet.
# The rules below follow src/backend/parser/scan.l; wherever this lexer and PostgreSQL's could
# disagree, it must err towards seeing more bare words, never fewer.

# scan.l's {space}; \v is whitespace from PostgreSQL 17 on and a syntax error before that.
_SPACE = frozenset(" \t\n\r\f\v")
# A "--" comment ends at the first \n or \r: a bare \r ends it too.
_NEWLINE = frozenset("\n\r")
_LINE_END = re.compile(r"[\n\r]")
_BLOCK_EDGE = re.compile(r"/\*|\*/")
# Identifiers: ASCII letters, _ and every byte >= 0x80 (so every non-ASCII character of a UTF-8
# string), then digits and $ too. `€$b$` is one identifier, not `€` and a dollar quote.
_IDENT = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z_0-9$\x80-\U0010ffff]*")
# A dollar-quote delimiter: $$ or $tag$ with a tag shaped like an identifier without $. It only
# opens where a token starts, which _IDENT's greed guarantees (a $ inside a word is taken).
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z_0-9\x80-\U0010ffff]*)?\$")
# Keywords are ASCII case-insensitive; str.lower() would also fold some non-ASCII letters
# (the Kelvin sign to k) into keywords PostgreSQL does not see.
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
# One-letter prefixes that make the quote after them part of the same token: E'' takes
# backslash escapes; B'', X'', N'' do not.
_STRING_PREFIXES = frozenset("eEbBxXnN")

# Words that only a statement changing data or schema contains (outside strings and comments).
_WRITE_WORDS = frozenset(
    ("insert", "update", "delete", "merge", "truncate", "copy", "create", "drop", "alter",
     "grant", "revoke", "into")
)


def _skip_blank(sql: str, i: int) -> int:
    """Index of the first character at or after i that is not whitespace or in a comment."""
    n = len(sql)
    while i < n:
        if sql[i] in _SPACE:
            i += 1
        elif sql.startswith("--", i):
            end = _LINE_END.search(sql, i)
            i = n if end is None else end.start()
        elif sql.startswith("/*", i):  # block comments nest
            depth, i = 1, i + 2
            while depth:
                edge = _BLOCK_EDGE.search(sql, i)
                if edge is None:
                    raise ValueError("unterminated /* comment")
                depth += 1 if edge.group(0) == "/*" else -1
                i = edge.end()
        else:
            break
    return i


def _continues(sql: str, i: int) -> int | None:
    """Where the string that closed just before i goes on, or None: two quoted strings
    separated only by whitespace and -- comments holding at least one newline are one
    string, and the second part keeps the first part's escaping rule (E'' escapes too)."""
    n, newline = len(sql), False
    while i < n:
        if sql[i] in _NEWLINE:
            newline, i = True, i + 1
        elif sql[i] in _SPACE:
            i += 1
        elif sql.startswith("--", i):
            end = _LINE_END.search(sql, i)
            i = n if end is None else end.start()
        else:
            break
    return i if newline and i < n and sql[i] == "'" else None


def _skip_string(sql: str, start: int, backslashes: bool) -> int:
    """Index just past the single-quoted string (continuations included) opening at start;
    backslashes: an E'' string, where a backslash escapes the next character. The session's
    standard_conforming_strings is on (the collector sets it), so '' strings take none."""
    stop = re.compile(r"[\\']" if backslashes else "'")
    i = start + 1
    while (found := stop.search(sql, i)) is not None:
        at = found.start()
        if sql[at] == "\\" or sql.startswith("''", at):  # an escape, or a doubled quote
            i = at + 2
        elif (again := _continues(sql, at + 1)) is not None:
            i = again + 1
        else:
            return at + 1
    raise ValueError("unterminated quoted string")


def _skip_quoted_identifier(sql: str, start: int) -> int:
    """Index just past the double-quoted identifier opening at start ("" inside is a ")."""
    i = start + 1
    while (at := sql.find('"', i)) >= 0:
        if not sql.startswith('""', at):
            return at + 1
        i = at + 2
    raise ValueError("unterminated quoted identifier")


def sql_words(sql: str) -> list[str]:
    """The lower-cased bare words of one SQL statement: comments, string literals and quoted
    identifiers are skipped; raise ValueError when a second statement follows a ';', or the
    text cannot be one statement (unterminated, NUL, not UTF-8)."""
    if "\0" in sql:
        raise ValueError("contains a NUL character")
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid UTF-8 text") from None
    words: list[str] = []
    i, n, ended = 0, len(sql), False
    while (i := _skip_blank(sql, i)) < n:
        if ended:
            raise ValueError("must be a single statement, found more after ';'")
        char = sql[i]
        if char == ";":
            ended, i = True, i + 1
        elif char == "'":
            i = _skip_string(sql, i, backslashes=False)
        elif char == '"':  # U&"..." too: the U is a word, the & an operator character
            i = _skip_quoted_identifier(sql, i)
        elif (tag := _DOLLAR_TAG.match(sql, i)) is not None:
            end = sql.find(tag.group(0), tag.end())
            if end < 0:
                raise ValueError("unterminated dollar-quoted string")
            i = end + len(tag.group(0))
        elif (word := _IDENT.match(sql, i)) is not None:
            text, i = word.group(0), word.end()
            if text in _STRING_PREFIXES and sql.startswith("'", i):
                i = _skip_string(sql, i, backslashes=text in "eE")
            else:
                words.append(text.translate(_ASCII_LOWER))
        else:  # digits, operators, punctuation: one character at a time
            i += 1
    return words


def sql_problem(sql: str) -> str | None:
    """Why sql is not a single read-only SELECT (or WITH ... SELECT) statement, or None."""
    try:
        words = sql_words(sql)
    except ValueError as exc:
        return str(exc)
    if not words or words[0] not in ("select", "with"):
        return "must be a single SELECT or WITH ... SELECT statement"
    for previous, word in zip(["", *words[:-1]], words, strict=True):
        if word in _WRITE_WORDS:
            return f"must only read data, found {word.upper()}"
        if word == "share" and previous in ("for", "key"):
            return "must only read data, found a row lock (FOR SHARE)"
    return None
