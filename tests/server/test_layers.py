"""HTTP stays at the edge: only ``server/http`` (and the deployments that wrap its app, such as
Ray Serve's) may import a web framework."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "server"
HTTP_LIBRARIES = {"fastapi", "starlette", "uvicorn", "httpx", "multipart", "python_multipart"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_server_http_imports_http_libraries() -> None:
    edges = {"http", "deployments"}
    outside = [p for p in SERVER.rglob("*.py") if not edges & set(p.relative_to(SERVER).parts)]
    assert len(outside) >= 8  # policy, engine, batcher, service, errors, metrics, preprocess, settings
    offenders = {str(p.relative_to(SERVER)): sorted(imported_roots(p) & HTTP_LIBRARIES) for p in outside}
    assert not {k: v for k, v in offenders.items() if v}


def test_server_http_is_where_the_app_lives() -> None:
    assert "fastapi" in imported_roots(SERVER / "http" / "app.py")
