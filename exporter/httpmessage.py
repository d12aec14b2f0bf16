"""HTTP/1.1 messages: a strict request parser and the heads of our answers.

Pure functions of bytes and strings (no sockets): what the server accepts as a request, by
RFC 9112's rules, and how its answers start. Nothing of a client's bytes is ever echoed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING

from exporter import __version__

if TYPE_CHECKING:
    from exporter.webconfig import WebSecurity

# A scraper's request is a few hundred bytes: anything near these limits is not one.
MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 8192
MAX_HEADERS = 100
MAX_ACCEPT_ITEMS = 32
_QVALUE = re.compile(r"0(?:\.\d{0,3})?|1(?:\.0{0,3})?")

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
# Control characters (HTAB allowed), which covers CR, LF and NUL, and DEL.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_FORBIDDEN = re.compile(rb"[\x00-\x20\x7f]")
_ABSOLUTE_FORM = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)", re.DOTALL)
_DIGITS = re.compile(r"[0-9]{1,18}")

PLAIN_TYPE = "text/plain; charset=utf-8"
_SERVER = f"qatoolbox-exporter/{__version__}"


class RequestError(Exception):
    """A request the parser refuses: the status to answer and why (our words, never the
    client's bytes). answer=False closes the connection without a word."""

    def __init__(self, status: int, reason: str, answer: bool = True) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.answer = answer


@dataclass
class Request:
    """One parsed request head."""

    method: str
    path: str
    version: str  # "HTTP/1.0" or "HTTP/1.1"
    headers: dict[str, list[str]] = field(default_factory=dict)  # lower-case names
    keep_alive: bool = True

    def header(self, name: str) -> str | None:
        """The first value of a header."""
        values = self.headers.get(name)
        return values[0] if values else None

    def joined(self, name: str) -> str:
        """A list-valued header's values as one comma-separated value."""
        return ", ".join(self.headers.get(name, ()))


def request_path(target: bytes) -> str:
    """The path of an origin-form (/metrics?x) or absolute-form (http://host/metrics) request
    target, which RFC 9112 says a server must accept; anything else is a 400."""
    if _TARGET_FORBIDDEN.search(target):
        raise RequestError(400, "control character in the request target")
    if target.startswith(b"/"):
        return target.split(b"?", 1)[0].decode("latin-1")
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None or match.group(1).lower() not in (b"http", b"https"):
        raise RequestError(400, "invalid request target")
    authority, rest = match.group(2), match.group(3)
    if not authority or b"@" in authority:
        raise RequestError(400, "invalid request target")
    path = rest.split(b"?", 1)[0] or b"/"
    if not path.startswith(b"/"):
        raise RequestError(400, "invalid request target")
    return path.decode("latin-1")


def parse_request_line(line: bytes) -> tuple[str, bytes, str]:
    """(method, target, version) of `method SP target SP HTTP/1.x`, single spaces only."""
    parts = line.split(b" ")
    if len(parts) == 2:
        raise RequestError(400, "request line without an HTTP version (HTTP/0.9)")
    if len(parts) != 3 or not parts[1]:
        raise RequestError(400, "malformed request line")
    method, target, version = parts
    if not TOKEN.fullmatch(method):
        raise RequestError(400, "invalid method")
    match = _VERSION.fullmatch(version)
    if match is None:
        raise RequestError(400, "malformed HTTP version")
    if match.group(1) != b"1":
        raise RequestError(505, "HTTP version not supported")
    return method.decode("ascii"), target, "HTTP/1.0" if match.group(2) == b"0" else "HTTP/1.1"


def parse_headers(block: bytes) -> dict[str, list[str]]:
    """Header lines (each ending in LF, optionally CRLF) into lower-case names and values."""
    lines = block.split(b"\n")[:-1]
    if len(lines) > MAX_HEADERS:
        raise RequestError(431, "too many header fields")
    headers: dict[str, list[str]] = {}
    for raw in lines:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line[:1] in (b" ", b"\t"):
            raise RequestError(400, "obsolete line folding in a header")
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name):
            raise RequestError(400, "malformed header line")
        value = value.strip(b" \t")
        if _CONTROL.search(value):
            raise RequestError(400, "control character in a header value")
        headers.setdefault(name.decode("ascii").lower(), []).append(value.decode("latin-1"))
    return headers


def _tokens(value: str) -> set[str]:
    return {item.strip().lower() for item in value.split(",")}


def finish_request(method: str, target: bytes, version: str,
                   headers: dict[str, list[str]]) -> Request:
    """The request, after the checks that need all its headers: message framing (RFC 9112
    section 6: conflicting lengths are how requests get smuggled) and connection reuse."""
    if len(headers.get("host", ())) > 1:
        raise RequestError(400, "more than one Host header")
    lengths = {value.strip() for value in headers.get("content-length", ())}
    if len(lengths) > 1:
        raise RequestError(400, "conflicting Content-Length headers")
    if lengths and not _DIGITS.fullmatch(next(iter(lengths))):
        raise RequestError(400, "invalid Content-Length")
    body = bool(lengths) and int(next(iter(lengths))) > 0
    if "transfer-encoding" in headers:
        if lengths:
            raise RequestError(400, "Content-Length together with Transfer-Encoding")
        if version == "HTTP/1.0":
            raise RequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in ",".join(headers["transfer-encoding"]).split(",")]
        if codings != ["chunked"]:
            raise RequestError(501, "unsupported Transfer-Encoding")
        body = True
    if method in ("GET", "HEAD"):
        path = request_path(target)
    else:
        try:
            path = request_path(target)  # for the log line only: the answer is a 405
        except RequestError:
            path = ""
    connection = _tokens(",".join(headers.get("connection", ())))
    keep_alive = ("keep-alive" in connection if version == "HTTP/1.0"
                  else "close" not in connection)
    # A body is never read: the connection cannot carry another request after it.
    return Request(method, path, version, headers, keep_alive and not body)


def accepts_gzip(header: str) -> bool:
    """Whether Accept-Encoding lists gzip with a non-zero quality (codings ignore case)."""
    for item in header.split(",")[:MAX_ACCEPT_ITEMS]:
        coding, *params = (part.strip() for part in item.split(";"))
        if coding.lower() not in ("gzip", "x-gzip"):
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                quality = float(value) if _QVALUE.fullmatch(value) else 0.0
        return quality > 0
    return False



# --- responses ----------------------------------------------------------------------------------


@dataclass
class Response:
    """What to answer; the head is built by the server (status line, Date, framing, the web
    config's headers), from our own strings only."""

    status: int
    body: bytes = b""
    content_type: str = PLAIN_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False


def plain(status: int, text: str, *headers: tuple[str, str], close: bool = False) -> Response:
    return Response(status, text.encode(), PLAIN_TYPE, list(headers), close)


_date_cache: list[tuple[int, str]] = [(0, "")]
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: int) -> str:
    """RFC 9110's IMF-fixdate, in English whatever the locale (email.utils, which does the
    same, costs 0.3 MB of imports for this one line)."""
    t = time.gmtime(seconds)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def _http_date() -> str:
    now = int(time.time())
    cached = _date_cache[0]
    if cached[0] != now:
        cached = _date_cache[0] = (now, http_date(now))
    return cached[1]


def head(response: Response, security: WebSecurity, close: bool,
         request: Request | None = None) -> bytes:
    # A HEAD answer has the same head as the GET's, Content-Length included.
    lines = [f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}",
             f"Server: {_SERVER}", f"Date: {_http_date()}",
             f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}"]
    lines += [f"{name}: {value}" for name, value in response.headers]
    lines += [f"{name}: {value}" for name, value in security.headers]
    if close:
        lines.append("Connection: close")
    elif request is not None and request.version == "HTTP/1.0":
        lines.append("Connection: keep-alive")  # an HTTP/1.0 client closes without it
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# A TLS handshake record starts with content type 22, version 3.x.
TLS_RECORD = (0x16, 0x03)


def next_request(buf: bytearray, first_plain: bool) -> Request | None:
    """The next complete request in buf (consumed from it), or None until more is read.
    first_plain: nothing has been asked on this plain-text connection yet, so a TLS handshake
    is recognised (and refused without an answer)."""
    start = 0
    # RFC 9112 section 2.2: empty lines before a request line are ignored.
    while buf.startswith(b"\n", start) or buf.startswith(b"\r\n", start):
        start += 1 if buf[start] == 0x0A else 2
    if start:
        del buf[:start]
    if not buf:
        return None
    if first_plain and buf[0] == TLS_RECORD[0]:
        if len(buf) == 1:
            return None
        if buf[1] == TLS_RECORD[1]:
            raise RequestError(400, "TLS handshake on the plain HTTP port", answer=False)
    line_end = buf.find(b"\n")
    if line_end < 0:
        if len(buf) > MAX_REQUEST_LINE:
            raise RequestError(414, "request line too long")
        space = buf.find(b" ")
        start_of_line = bytes(buf[:space] if space >= 0 else buf.rstrip(b"\r"))
        if start_of_line and not TOKEN.fullmatch(start_of_line):
            raise RequestError(400, "invalid method")
        return None
    line = bytes(buf[:line_end])
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > MAX_REQUEST_LINE:
        raise RequestError(414, "request line too long")
    method, target, version = parse_request_line(line)
    ends = [i for i in (buf.find(b"\n\r\n", line_end), buf.find(b"\n\n", line_end))
            if i >= 0]
    if not ends:
        if len(buf) - line_end - 1 > MAX_HEADER_BYTES:
            raise RequestError(431, "request header too large")
        if buf.count(b"\n", line_end + 1) > MAX_HEADERS:
            raise RequestError(431, "too many header fields")
        return None
    end = min(ends)
    block = bytes(buf[line_end + 1:end + 1])
    if len(block) > MAX_HEADER_BYTES:
        raise RequestError(431, "request header too large")
    del buf[:end + (3 if buf[end + 1] == 0x0D else 2)]
    return finish_request(method, target, version, parse_headers(block))
