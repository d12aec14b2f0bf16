"""The harness's own promises: a paused server really stops answering, then recovers."""

from __future__ import annotations

import threading
from typing import Any

from tests.harness import PostgresServer, RedisServer


def _query_in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_paused_postgres_backends_do_not_answer(postgres: PostgresServer) -> None:
    with postgres.connect() as conn:
        postgres.pause()
        thread, result = _query_in_thread(lambda: conn.execute("select 1").fetchall())
        thread.join(1.5)
        alive_while_paused = thread.is_alive()
        postgres.resume()
        thread.join(10)
    assert alive_while_paused, f"an open connection answered while paused: {result}"
    assert result.get("value") == [(1,)]


def test_paused_redis_does_not_answer(redis_server: RedisServer) -> None:
    client = redis_server.client(socket_timeout=10)
    client.ping()
    redis_server.pause()
    thread, result = _query_in_thread(client.ping)
    thread.join(1.5)
    alive_while_paused = thread.is_alive()
    redis_server.resume()
    thread.join(10)
    client.close()
    assert alive_while_paused, f"Redis answered while paused: {result}"
    assert result.get("value") is True


def test_redis_with_requirepass_starts(redis_factory: Any) -> None:
    server = redis_factory(extra_args=["--requirepass", "s3cret"])
    client = server.client(password="s3cret")
    try:
        assert client.ping() is True
    finally:
        client.close()
