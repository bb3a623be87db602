"""Fresh request ids: uuid4-like, unique, and not shared by forked processes."""

from __future__ import annotations

import os
import re

from exitserve.server.http.security import new_request_id


def test_ids_are_32_hex_digits_and_unique() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_gets_its_own_sequence() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = new_request_id()
    assert child[:16] != parent[:16]


def test_behind_a_proxy_that_sets_it_the_app_sends_no_request_id_of_its_own(tmp_path) -> None:
    """Ray Serve's proxy adds X-Request-ID itself; the replica's app must not repeat it,
    yet still say who answered."""
    from fastapi.testclient import TestClient

    from exitserve.server.http.app import create_app
    from exitserve.server.settings import Settings

    settings = Settings(model_repository=tmp_path)  # no lifespan here: the middleware is what is tested
    assert TestClient(create_app(settings)).get("/healthz").headers["x-request-id"]
    app = create_app(settings, identity={"x-exitserve-replica": "r1"}, request_id_header=False)
    response = TestClient(app).get("/healthz", headers={"x-request-id": "from-proxy"})
    assert "x-request-id" not in response.headers
    assert response.headers["x-exitserve-replica"] == "r1"
