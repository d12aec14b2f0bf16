"""A small client for Prometheus' HTTP API on urllib: instant and range queries, metric names.

Only the documented /api/v1 endpoints are used, with POST forms for queries, so the same code
talks to Prometheus, VictoriaMetrics, Thanos Query and Mimir. Every answer is treated as
hostile: size-capped, type-checked, and errors become one line without credentials.
"""

from __future__ import annotations

import base64
import json
import math
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from exporter.redact import redact_url
from exporter.report.tlsclient import client_context

MAX_BODY = 256 * 1024 * 1024  # a week of raw samples for a few thousand series fits
MAX_POINTS = 10_000  # Prometheus refuses more than 11,000 points per series in a range query


class PromError(Exception):
    """A failed call, as one line. kind: unreachable, timeout, auth, bad_query, execution,
    http or protocol."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class SettingsError(ValueError):
    """A bad connection setting (flag or HTTP config file)."""


@dataclass(frozen=True)
class HttpSettings:
    """How to reach Prometheus: Prometheus' http_config subset (basic auth, bearer token,
    TLS). Secrets are held as read from their files and never printed."""

    username: str = ""
    password: str = ""
    bearer_token: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure_skip_verify: bool = False

    def __repr__(self) -> str:
        hidden = ("<secret>" if self.password else "", "<secret>" if self.bearer_token else "")
        return (f"HttpSettings(username={self.username!r}, password={hidden[0]}, "
                f"bearer_token={hidden[1]}, ca_file={self.ca_file!r})")


_HTTP_CONFIG_KEYS = {"basic_auth", "authorization", "bearer_token", "bearer_token_file",
                     "tls_config"}


def _read_secret(path: str, what: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    secret = text.strip()
    if not secret:
        raise SettingsError(f"{what}: {path} is empty")
    return secret


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SettingsError(f"{where}: expected a mapping")
    return value


def _string(section: Mapping[str, Any], key: str, where: str) -> str:
    value = section.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SettingsError(f"{where}.{key}: expected a string")
    return value


def load_http_config(path: str) -> HttpSettings:
    """Read an HTTP client config file in Prometheus' http_config format (the one
    `promtool --http.config.file` takes): basic_auth, authorization, bearer_token(_file),
    tls_config. Unknown keys are errors."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"--http.config.file: cannot read {path}: "
                            f"{exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SettingsError(f"--http.config.file: {path} is not valid YAML{where}") from None
    doc = _mapping(raw, path)
    unknown = sorted(set(doc) - _HTTP_CONFIG_KEYS)
    if unknown:
        raise SettingsError(f"{path}: unknown key {unknown[0]} (supported: "
                            f"{', '.join(sorted(_HTTP_CONFIG_KEYS))})")
    basic = _mapping(doc.get("basic_auth"), "basic_auth")
    username = _string(basic, "username", "basic_auth")
    password = _string(basic, "password", "basic_auth")
    password_file = _string(basic, "password_file", "basic_auth")
    if password_file:
        password = _read_secret(password_file, "basic_auth.password_file")
    token = _string(doc, "bearer_token", "")
    if doc.get("bearer_token_file"):
        token = _read_secret(_string(doc, "bearer_token_file", ""), "bearer_token_file")
    auth = _mapping(doc.get("authorization"), "authorization")
    if auth:
        kind = _string(auth, "type", "authorization") or "Bearer"
        if kind.lower() != "bearer":
            raise SettingsError(f"authorization.type: only Bearer is supported, got {kind}")
        token = _string(auth, "credentials", "authorization")
        if auth.get("credentials_file"):
            token = _read_secret(_string(auth, "credentials_file", "authorization"),
                                 "authorization.credentials_file")
    if (username or password) and token:
        raise SettingsError(f"{path}: basic_auth and a bearer token are mutually exclusive")
    tls = _mapping(doc.get("tls_config"), "tls_config")
    unknown_tls = sorted(set(tls) - {"ca_file", "cert_file", "key_file", "insecure_skip_verify"})
    if unknown_tls:
        raise SettingsError(f"tls_config.{unknown_tls[0]}: not supported (supported: ca_file, "
                            "cert_file, key_file, insecure_skip_verify)")
    skip = tls.get("insecure_skip_verify", False)
    if not isinstance(skip, bool):
        raise SettingsError("tls_config.insecure_skip_verify: expected true or false")
    return HttpSettings(username, password, token, _string(tls, "ca_file", "tls_config"),
                        _string(tls, "cert_file", "tls_config"),
                        _string(tls, "key_file", "tls_config"), skip)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects would carry the Authorization header to wherever they point: refuse them."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,  # noqa: PLR0917
                         headers: Any, newurl: str) -> None:
        fp.close()
        raise PromError("http", f"Prometheus answered HTTP {code} redirecting to "
                        f"{redact_url(newurl)}; use that address in --prometheus")


@dataclass(frozen=True)
class Series:
    """One series of a range query or a range-vector instant query."""

    labels: dict[str, str]
    points: list[tuple[float, str]]  # time, value as Prometheus wrote it


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector."""

    labels: dict[str, str]
    value: float


def series_name(labels: Mapping[str, str]) -> str:
    """metric{a="b"} as Prometheus prints a series."""
    name = labels.get("__name__", "")
    rest = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())
                    if k != "__name__")
    return f"{name}{{{rest}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _float(text: Any) -> float:
    if not isinstance(text, str):
        raise PromError("protocol", "Prometheus returned a sample value that is not a string")
    try:
        return float(text)
    except ValueError:
        raise PromError("protocol", f"Prometheus returned a bad sample value {text[:40]!r}"
                        ) from None


def _labels(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in raw.items()):
        raise PromError("protocol", "Prometheus returned malformed series labels")
    return dict(raw)


class Client:
    """Prometheus at base_url with the given settings; each call waits at most timeout."""

    def __init__(self, base_url: str, settings: HttpSettings = HttpSettings(),
                 timeout: float = 60.0) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise SettingsError(f"--prometheus: expected an http:// or https:// URL, got "
                                f"{redact_url(base_url)!r}")
        if parsed.username is not None and not settings.username and not settings.bearer_token:
            settings = HttpSettings(urllib.parse.unquote(parsed.username),
                                    urllib.parse.unquote(parsed.password or ""), "",
                                    settings.ca_file, settings.cert_file, settings.key_file,
                                    settings.insecure_skip_verify)
        netloc = parsed.hostname if ":" not in parsed.hostname else f"[{parsed.hostname}]"
        if parsed.port:
            netloc += f":{parsed.port}"
        self.base = urllib.parse.urlunsplit((parsed.scheme, netloc,
                                             parsed.path.rstrip("/"), "", ""))
        self.display = self.base  # never holds credentials
        self.timeout = timeout
        self._headers = {"User-Agent": "qatoolbox-exporter-report",
                         "Accept": "application/json"}
        if settings.bearer_token:
            self._headers["Authorization"] = f"Bearer {settings.bearer_token}"
        elif settings.username or settings.password:
            token = base64.b64encode(f"{settings.username}:{settings.password}".encode())
            self._headers["Authorization"] = f"Basic {token.decode()}"
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect(),
                                                      urllib.request.ProxyHandler({})]
        if parsed.scheme == "https":
            handlers.append(urllib.request.HTTPSHandler(context=self._tls(settings)))
        elif settings.ca_file or settings.cert_file:
            raise SettingsError("TLS settings given but --prometheus is an http:// URL")
        self._opener = urllib.request.build_opener(*handlers)

    @staticmethod
    def _tls(settings: HttpSettings) -> ssl.SSLContext:
        try:
            return client_context(settings.ca_file, settings.cert_file, settings.key_file,
                                  settings.insecure_skip_verify)
        except ValueError as exc:
            raise SettingsError(f"TLS settings: {_one_line(str(exc))}") from None

    # --- transport -----------------------------------------------------------------------

    def _call(self, path: str, params: Sequence[tuple[str, str]], post: bool = True) -> Any:
        url = f"{self.base}/api/v1/{path}"
        body = urllib.parse.urlencode(params).encode()
        if post:
            request = urllib.request.Request(url, data=body, method="POST", headers={
                **self._headers, "Content-Type": "application/x-www-form-urlencoded"})
        else:
            request = urllib.request.Request(f"{url}?{body.decode()}", headers=self._headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read(MAX_BODY + 1)
        except urllib.error.HTTPError as exc:
            with exc:
                raise self._http_error(exc) from None
        except PromError:
            raise
        except TimeoutError:
            raise PromError("timeout", f"Prometheus at {self.display} did not answer within "
                            f"{self.timeout:g}s") from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except (OSError, ValueError) as exc:  # reset mid-body, bad chunking, ...
            raise self._unreachable(exc) from None
        if len(raw) > MAX_BODY:
            raise PromError("protocol", f"Prometheus' answer exceeds {MAX_BODY >> 20} MiB; "
                            "narrow the query or the range")
        try:
            doc = json.loads(raw)
        except ValueError:
            raise PromError("protocol", f"{self.display} did not answer with JSON: is it the "
                            "Prometheus API?") from None
        if not isinstance(doc, dict) or doc.get("status") != "success":
            raise PromError("protocol", f"{self.display} answered without success status")
        return doc.get("data")

    def _unreachable(self, reason: Any) -> PromError:
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return PromError("timeout", f"Prometheus at {self.display} did not answer within "
                             f"{self.timeout:g}s")
        if isinstance(reason, ssl.SSLError):
            return PromError("unreachable", f"TLS with {self.display} failed: "
                             f"{_one_line(getattr(reason, 'reason', None) or str(reason))}")
        text = getattr(reason, "strerror", None) or str(reason)
        return PromError("unreachable", f"cannot reach Prometheus at {self.display}: "
                         f"{_one_line(text)}")

    def _http_error(self, exc: urllib.error.HTTPError) -> PromError:
        code = exc.code
        detail, error_type = "", ""
        try:
            doc = json.loads(exc.read(65536))
            if isinstance(doc, dict):
                detail = _one_line(str(doc.get("error", "")))
                error_type = str(doc.get("errorType", ""))
        except (ValueError, OSError):
            pass
        if code in (401, 403):
            return PromError("auth", f"Prometheus at {self.display} refused the request "
                             f"(HTTP {code}): check the credentials")
        if code == 404:
            return PromError("http", f"no Prometheus API at {self.display} (HTTP 404): check "
                             "--prometheus")
        if code == 400 or error_type == "bad_data":
            return PromError("bad_query", detail or f"HTTP {code}")
        if error_type in ("timeout", "canceled"):
            return PromError("timeout", f"Prometheus gave up on the query: {detail}")
        if code == 422 or error_type == "execution":
            return PromError("execution", detail or f"HTTP {code}")
        return PromError("http", f"Prometheus at {self.display} answered HTTP {code}"
                         + (f": {detail}" if detail else ""))

    # --- API -----------------------------------------------------------------------------

    def _query_params(self, expr: str) -> list[tuple[str, str]]:
        return [("query", expr), ("timeout", f"{max(1, int(self.timeout))}s")]

    def instant(self, expr: str, at: float) -> list[Sample]:
        """An instant query that must return a vector (or a scalar, as one unlabelled
        sample)."""
        data = self._call("query", [*self._query_params(expr), ("time", f"{at:.3f}")])
        kind, result = self._result(data)
        if kind == "scalar":
            return [Sample({}, _float(result[1]))] if isinstance(result, list) else []
        if kind != "vector":
            raise PromError("protocol", f"expected a vector, Prometheus returned a {kind}")
        samples = []
        for item in result:
            value = item.get("value") if isinstance(item, dict) else None
            if not isinstance(value, list) or len(value) != 2:
                raise PromError("protocol", "Prometheus returned a malformed sample")
            samples.append(Sample(_labels(item.get("metric", {})), _float(value[1])))
        return samples

    def raw(self, expr: str, at: float) -> list[Series]:
        """An instant query of a range selector (e.g. ALERTS[7d]): the stored samples."""
        data = self._call("query", [*self._query_params(expr), ("time", f"{at:.3f}")])
        kind, result = self._result(data)
        if kind != "matrix":
            raise PromError("protocol", f"expected a matrix, Prometheus returned a {kind}")
        return self._matrix(result)

    def range(self, expr: str, start: float, end: float, step: int,
              progress: Any = None) -> list[Series]:
        """A range query, in chunks of at most MAX_POINTS points per series."""
        merged: dict[tuple[tuple[str, str], ...], Series] = {}
        chunk = step * (MAX_POINTS - 1)
        begin = start
        pieces = max(1, math.ceil((end - start + step) / (chunk + step)))
        done = 0
        while begin <= end:
            stop = min(end, begin + chunk)
            data = self._call("query_range", [*self._query_params(expr),
                                              ("start", f"{begin:.3f}"), ("end", f"{stop:.3f}"),
                                              ("step", f"{step}")])
            kind, result = self._result(data)
            if kind != "matrix":
                raise PromError("protocol", f"expected a matrix, Prometheus returned a {kind}")
            for series in self._matrix(result):
                key = tuple(sorted(series.labels.items()))
                if key in merged:
                    merged[key].points.extend(series.points)
                else:
                    merged[key] = series
            done += 1
            if progress is not None:
                progress(done, pieces)
            begin = stop + step
        return list(merged.values())

    def metric_names(self, match: str, start: float, end: float) -> set[str]:
        """Names of the series matching a selector between start and end (Prometheus answers
        per storage block, so this is a superset for the exact range)."""
        data = self._call("label/__name__/values", [("match[]", match), ("start", f"{start:.3f}"),
                                                    ("end", f"{end:.3f}")], post=False)
        if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
            raise PromError("protocol", "Prometheus returned malformed label values")
        return set(data)

    def label_values(self, label: str, start: float, end: float) -> list[str]:
        data = self._call(f"label/{urllib.parse.quote(label)}/values",
                          [("start", f"{start:.3f}"), ("end", f"{end:.3f}")], post=False)
        if not isinstance(data, list):
            raise PromError("protocol", "Prometheus returned malformed label values")
        return [str(v) for v in data]

    @staticmethod
    def _result(data: Any) -> tuple[str, Any]:
        if not isinstance(data, dict) or "resultType" not in data:
            raise PromError("protocol", "Prometheus returned a query answer without a result")
        result = data.get("result")
        if data["resultType"] in ("vector", "matrix") and not isinstance(result, list):
            raise PromError("protocol", "Prometheus returned a malformed result")
        return str(data["resultType"]), result

    @staticmethod
    def _matrix(result: list[Any]) -> list[Series]:
        out = []
        for item in result:
            values = item.get("values") if isinstance(item, dict) else None
            if not isinstance(values, list):
                raise PromError("protocol", "Prometheus returned a malformed series")
            points = []
            for point in values:
                if not (isinstance(point, list) and len(point) == 2
                        and isinstance(point[0], (int, float)) and isinstance(point[1], str)):
                    raise PromError("protocol", "Prometheus returned a malformed point")
                _float(point[1])
                points.append((float(point[0]), point[1]))
            out.append(Series(_labels(item.get("metric", {})), points))
        return out
