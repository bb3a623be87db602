"""The installed package: one top-level name, ``exitserve``, so an install neither shadows
nor is shadowed by a user's own ``models`` or ``server``. The wheel built from this checkout,
installed on its own into a folder, is imported and serves a real image from a working
directory that holds packages of those names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.support.images import encode, fashion_images
from tests.support.live import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
USERS_PACKAGES = ("models", "server")  # the names the repository's folders would have installed as

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = ROOT / "build"  # setuptools builds in the tree; what it leaves there would go into later wheels
    ours = not build.exists()
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                               "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    finally:
        if ours:
            shutil.rmtree(build, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    [built] = out.glob("exitserve-*.whl")
    return built


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"exitserve"}
    # the repository's folders are inside it, as subpackages
    assert {"exitserve/server/http/app.py", "exitserve/server/deployments/ray_serve.py",
            "exitserve/models/registry.py", "exitserve/exporter/export.py", "exitserve/loadtest/benchmark.py",
            "exitserve/errors.py"} <= set(names)


def test_a_users_own_models_and_server_stay_theirs(wheel: Path, served_repository: Path,
                                                   tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    work = tmp_path / "work"  # a user's project: the current directory comes first on sys.path
    for package in USERS_PACKAGES:
        (work / package).mkdir(parents=True)
        (work / package / "__init__.py").write_text('WHO = "user"\n')
    env = {**os.environ, "PYTHONPATH": str(site)}

    check = ("from pathlib import Path\n"
             "import exitserve.server.http.app, exitserve.models\n"
             "import models, server\n"
             "import exitserve.server\n"
             f"site = Path({str(site.resolve())!r})\n"
             "for package in (exitserve, exitserve.server, exitserve.models):\n"
             "    assert Path(package.__file__).resolve().is_relative_to(site), package.__file__\n"
             "assert models.WHO == 'user' and server.WHO == 'user', (models.__file__, server.__file__)\n")
    done = subprocess.run([sys.executable, "-c", check], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "exitserve.cli", "serve", "--model-repository",
                               str(served_repository), "--port", str(port), "--log-level", "warning"],
                              cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_ready(url, server)
        images, labels = fashion_images(1)
        answer = httpx.post(f"{url}/classify", params={"budget": "1"}, content=encode(images[0]),
                            headers={"content-type": "image/png"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["class_index"] == int(labels[0])
    finally:
        server.kill()
        server.wait(30)
