"""Photos, not thumbnails (issue 26): the default model served 28x28 PNGs, 640x480 JPEGs and
4000x3000 JPEGs, side by side.

The uploads are Fashion-MNIST test images: the 28x28 PNGs as they are, and the same images
upscaled into photos as a phone or a web page would send them: the item resized with Pillow's
bicubic filter to the frame's height (480x480, 3000x3000), centred in a black 4:3 frame
(640x480, 4000x3000), RGB, JPEG quality 90. The JPEGs are cached under ``--cache`` (encoding
a 12-megapixel JPEG takes about 0.1 s; fewer of those are made: ``--large-images``).

1. **Accuracy** (one default server, an httpx client with ``--client-concurrency`` requests in
   flight, ``POST /classify`` with the raw body and its Content-Type): the first ``--images``
   test images as 28x28 PNG and as 640x480 JPEG, and the first ``--large-images`` as 4000x3000
   JPEG; each against the labels, and the difference in points against the PNGs of the same
   images. Then the 640x480 JPEGs under each fit of ``--fit-modes``: a copy of the model
   folder whose ``manifest.json`` has ``input.fit`` set to it, served alone, one server at a
   time.
2. **Throughput** (wrk ``-t1 -c--concurrency``, ``--duration`` s after ``--warmup`` s of the
   same load, per upload): the same default server with each upload; the plain server
   (``loadtest.plain_server``) and its no-op route with the PNGs; req/s, p50/p99, the CPU of
   the server (its process tree) and of wrk, and the server's CPU per request.
3. **The 4000x3000 JPEG alone**: at C=1 on the same server (p50), and on a fresh default
   server warmed up with the PNGs: its resident memory (the process tree's RSS, from /proc,
   every 0.1 s) before, and at its peak while ``--rss-connections`` of them are in flight
   (wrk for ``--duration`` s).

Writes the JSON report (``--out``) and prints the command, Markdown tables and the issue's
target lines (met / MISSED, with the numbers). Traffic goes only to 127.0.0.1.

    python -m exitserve.loadtest.photos --repository model_repository --model msdnet_fmnist

Needs the model folder (``scripts/build_repository.sh`` builds ``model_repository``) and
``wrk`` (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
from PIL import Image

from exitserve.loadtest import monitoring
from exitserve.loadtest.soak import rss_mib
from exitserve.loadtest.overload import (
    process_tree,
    Server,
    measured_wrk,
    port_for,
    require_wrk,
    run_wrk,
    wrk_version,
    write_images,
)
from exitserve.loadtest.wrk_bench import WARMUP_S, Target, measure_target, start_target, stop_all, summarise

FIT_MODES = ("crop", "squash", "pad")
JPEG_QUALITY = 90
# (key, table label, frame, side of the item inside it)
PHOTO_640 = ("jpeg_640x480", "640x480 JPEG", (640, 480), 480)
PHOTO_4000 = ("jpeg_4000x3000", "4000x3000 JPEG", (4000, 3000), 3000)
PNG = ("png", "28x28 PNG")

# the targets
JPEG_RATE_TARGET = 0.7  # 640x480 JPEG at C=32: at least 0.7x the 28x28 PNG rate
LARGE_P50_TARGET_MS = 15.0  # 4000x3000 JPEG at C=1: p50 under 15 ms
RSS_GROWTH_TARGET_MB = 100.0  # 4000x3000 JPEGs, 16 in flight: RSS growth under 100 MB
ACCURACY_TARGET_POINTS = 1.0  # upscaled photos within 1 point of the 28x28 originals
PLAIN_TARGET = 3.0  # 28x28 PNG at C=32: at least 3x the plain server ...
NOOP_TARGET = 0.25  # ... and 25% of the no-op route
MB = 1024 * 1024


# --------------------------------------------------------------------------- the uploads


@dataclass
class Upload:
    """One kind of upload: its files (the first ``len(files)`` test images, in order), the
    labels of the same images, and the folder wrk cycles through."""

    key: str
    label: str
    content_type: str
    files: list[Path]
    labels: np.ndarray
    wrk_dir: Path


def photo_jpeg(pixels: np.ndarray, frame: tuple[int, int], side: int, quality: int = JPEG_QUALITY) -> bytes:
    """A 28x28 grey item as a photo: bicubic to ``side`` x ``side``, centred in a black RGB
    ``frame``, JPEG at ``quality``."""
    import io

    item = Image.fromarray(pixels[..., 0] if pixels.ndim == 3 else pixels, "L")
    item = item.resize((side, side), Image.BICUBIC).convert("RGB")
    canvas = Image.new("RGB", frame)
    canvas.paste(item, ((frame[0] - side) // 2, (frame[1] - side) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def cached_photos(cache: Path, images: np.ndarray, frame: tuple[int, int], side: int,
                  label: str) -> tuple[list[Path], dict]:
    """The photos of ``images`` (test images 0, 1, ...), from the cache or encoded now (and
    cached: written under a temporary name, then renamed). Prints progress with the rate."""
    import PIL

    folder = cache / f"{frame[0]}x{frame[1]}_item{side}_q{JPEG_QUALITY}_pillow{PIL.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(len(images))]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    started = time.monotonic()
    for done, i in enumerate(missing, 1):
        partial = paths[i].with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(photo_jpeg(images[i], frame, side))
        partial.replace(paths[i])
        elapsed = time.monotonic() - started
        if done == len(missing) or done % 8 == 0 or elapsed < 2:
            each = elapsed / done
            print(f"\r{label}: encoded {done}/{len(missing)} ({each * 1000:.0f} ms each, "
                  f"{each * (len(missing) - done):.0f} s left){' ' * 8}", end="", file=sys.stderr, flush=True)
    seconds = time.monotonic() - started
    if missing:
        print(file=sys.stderr)
    print(f"{label}: {len(paths)} files in {folder} ({len(paths) - len(missing)} cached, "
          f"{len(missing)} encoded in {seconds:.1f} s)", file=sys.stderr)
    sizes = [p.stat().st_size for p in paths]
    return paths, {"files": len(paths), "cached": len(paths) - len(missing), "encoded": len(missing),
                   "encode_s": round(seconds, 3),
                   "encode_ms_each": round(1000 * seconds / len(missing), 2) if missing else None,
                   "mean_bytes": round(float(np.mean(sizes))) if sizes else 0, "folder": str(folder)}


def link_first(paths: list[Path], count: int, folder: Path) -> Path:
    """A folder holding the first ``count`` of ``paths`` (hard links; copies across file
    systems): what wrk cycles through (classify.lua lists regular files only)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths[:count]:
        target = folder / path.name
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
    return folder


def prepare_uploads(args: argparse.Namespace, work: Path) -> tuple[dict[str, Upload], dict]:
    from exitserve.models.data import load_splits

    test = load_splits("fashion-mnist").test
    n_small = max(args.images, args.wrk_images)
    n_large = max(args.large_images, args.large_files)
    if max(n_small, n_large) > len(test.labels):
        raise SystemExit(f"at most {len(test.labels)} test images")
    png_dir = work / "png"
    png_dir.mkdir()
    started = time.monotonic()
    write_images(png_dir, n_small)
    pngs = sorted(png_dir.glob("*.png"))
    generation = {"png": {"files": len(pngs), "encode_s": round(time.monotonic() - started, 3),
                          "mean_bytes": round(float(np.mean([p.stat().st_size for p in pngs])))}}
    uploads = {PNG[0]: Upload(PNG[0], PNG[1], "image/png", pngs[:args.images], test.labels[:args.images],
                              link_first(pngs, args.wrk_images, work / "wrk_png"))}
    for (key, label, frame, side), n, n_acc, n_wrk in ((PHOTO_640, n_small, args.images, args.wrk_images),
                                                       (PHOTO_4000, n_large, args.large_images, args.large_files)):
        paths, generation[key] = cached_photos(args.cache, test.images[:n], frame, side, label)
        uploads[key] = Upload(key, label, "image/jpeg", paths[:n_acc], test.labels[:n_acc],
                              link_first(paths, n_wrk, work / f"wrk_{key}"))
    return uploads, generation


# --------------------------------------------------------------------------- accuracy (Python client)


async def _classify_all(url: str, upload: Upload, concurrency: int) -> tuple[list[int | None], dict[str, int]]:
    import httpx

    predictions: list[int | None] = [None] * len(upload.files)
    failures: dict[str, int] = {}
    items = iter(range(len(upload.files)))
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:

        async def worker() -> None:
            for i in items:  # shared: each image sent once
                body = upload.files[i].read_bytes()
                try:
                    response = await client.post(url, content=body, headers={"content-type": upload.content_type})
                except httpx.HTTPError as exc:
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                    continue
                if response.status_code != 200:
                    key = str(response.status_code)
                    failures[key] = failures.get(key, 0) + 1
                    if len(failures) == 1 and failures[key] == 1:
                        print(f"\n{upload.label}: {response.status_code} {response.text[:300]}", file=sys.stderr)
                    continue
                predictions[i] = int(response.json()["class_index"])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return predictions, failures


def accuracy(server: Server, args: argparse.Namespace, upload: Upload, name: str) -> dict:
    """Every file of ``upload`` classified once; the answers against the labels."""
    url = f"{server.url}/classify?{urlencode({'model': args.model})}"
    started = time.monotonic()
    predictions, failures = asyncio.run(_classify_all(url, upload, args.client_concurrency))
    seconds = time.monotonic() - started
    correct = [p is not None and p == int(label) for p, label in zip(predictions, upload.labels)]
    answered = sum(p is not None for p in predictions)
    acc = float(np.mean(correct)) if correct else 0.0
    print(f"{name}: {upload.label}: accuracy {acc:.4f} on {len(correct)} images "
          f"({answered} answered, {seconds:.1f} s{f', failures {failures}' if failures else ''})", file=sys.stderr)
    return {"upload": upload.key, "label": upload.label, "images": len(correct), "answered_200": answered,
            "failures": failures, "correct": int(sum(correct)), "accuracy": acc, "seconds": round(seconds, 2),
            "_correct": correct}


def against_png(row: dict, png: dict) -> dict:
    """The PNG accuracy on the same images (the first ``row['images']``) and the difference."""
    same = png["_correct"][:row["images"]]
    png_acc = float(np.mean(same)) if same else 0.0
    return {**row, "png_accuracy_same_images": png_acc, "difference_points": 100 * (row["accuracy"] - png_acc)}


def fit_repository(source: Path, model: str, fit: str, root: Path) -> Path:
    """A repository holding a copy of the model folder whose manifest has ``input.fit = fit``."""
    repository = root / f"fit_{fit}"
    folder = repository / model
    shutil.copytree(source / model, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["input"]["fit"] = fit
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return repository


# --------------------------------------------------------------------------- memory


def tree_rss(pids: list[int]) -> int:
    """Resident bytes of ``pids`` together (the soak harness's per-process reading)."""
    return round(sum(rss_mib(pid) or 0.0 for pid in pids) * MB)


class RssSampler:
    """Samples the server process tree's RSS every ``interval`` s on a thread (the tree
    re-read every 2 s: workers)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids, refreshed, start = process_tree(self.pid), time.monotonic(), time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - refreshed > 2:
                pids, refreshed = process_tree(self.pid), now
            self.samples.append((round(now - start, 3), tree_rss(pids)))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- wrk


def exitserve_target(key: str, name: str, args: argparse.Namespace) -> Target:
    return Target(key, name, "exitserve", "/classify?" + urlencode({"model": args.model}), extra=args.server_env)


def wrk_row(wrk: str, server: Server, target: Target, upload: Upload, connections: int, args: argparse.Namespace,
            warmup: int) -> dict:
    """``warmup`` s of the same load (unmeasured), then one measured run."""
    url = f"{server.url}{target.route}"
    name = f"{target.name}, {upload.label} C={connections}"
    if warmup > 0:
        run_wrk(wrk, url, upload.wrk_dir, connections, warmup, f"{name} (warm-up)", args.wrk_timeout)
    run = measured_wrk(wrk, server, url, upload.wrk_dir, connections, args.duration, name, args.wrk_timeout)
    if server.proc.poll() is not None:
        raise RuntimeError(f"{target.name} died during the run:\n{server.log_tail()}")
    return with_upload(summarise(target, connections, run), upload)


def with_upload(row: dict, upload: Upload) -> dict:
    row = {**row, "upload": upload.key, "upload_label": upload.label, "files": len(list(upload.wrk_dir.iterdir()))}
    row["server_cpu_ms_per_request"] = 1000 * row["server_cpu_s"] / row["requests"] if row["requests"] else None
    return row


def memory_run(wrk: str, args: argparse.Namespace, uploads: dict[str, Upload], log: Path) -> dict:
    """A fresh default server, warmed up with the PNGs; its RSS before, and while
    ``--rss-connections`` 4000x3000 JPEGs are in flight."""
    target = exitserve_target("exitserve_memory", "exitserve (fresh, memory)", args)
    server = start_target(target, args, port_for(args.port, 90), log)
    try:
        url = f"{server.url}{target.route}"
        c = args.rss_connections
        if args.warmup > 0:
            run_wrk(wrk, url, uploads[PNG[0]].wrk_dir, c, args.warmup, f"{target.name}: PNG warm-up C={c}",
                    args.wrk_timeout)
        with RssSampler(server.pid) as before:
            time.sleep(1.0)
        baseline = statistics.median(rss for _, rss in before.samples)
        large = uploads[PHOTO_4000[0]]
        with RssSampler(server.pid) as during:
            run = measured_wrk(wrk, server, url, large.wrk_dir, c, args.duration, f"{target.name}, {large.label} C={c}",
                               args.wrk_timeout)
        row = with_upload(summarise(target, c, run), large)
        with RssSampler(server.pid) as after:
            time.sleep(0.5)
    finally:
        exit_status = stop_all(server)
    peak = max(rss for _, rss in during.samples)
    return {"connections": c, "baseline_mb": baseline / MB, "peak_mb": peak / MB, "growth_mb": (peak - baseline) / MB,
            "after_mb": statistics.median(rss for _, rss in after.samples) / MB,
            "samples": len(during.samples), "interval_s": 0.1, "row": row, "server_exit_status": exit_status,
            "rss_mb_during": [[t, round(rss / MB, 1)] for t, rss in during.samples]}


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict:
    wrk = require_wrk()
    logs = args.out.with_name(args.out.stem)
    report: dict = {"command": args.command, "repository": str(args.repository), "model": args.model,
                    "cpu_count": os.cpu_count(), "wrk": wrk_version(wrk),
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                 if k not in ("command", "out")}}
    with tempfile.TemporaryDirectory(prefix="exitserve-photos-") as tmp:
        work = Path(tmp)
        uploads, report["generation"] = prepare_uploads(args, work)
        png, small, large = uploads[PNG[0]], uploads[PHOTO_640[0]], uploads[PHOTO_4000[0]]

        # one default server: accuracy, then throughput per upload, then the large JPEG at C=1
        target = exitserve_target("exitserve", "exitserve", args)
        server = start_target(target, args, port_for(args.port, 0), Path(f"{logs}.exitserve.log"))
        try:
            acc_png = accuracy(server, args, png, "default")
            acc = [acc_png, against_png(accuracy(server, args, small, "default"), acc_png),
                   against_png(accuracy(server, args, large, "default"), acc_png)]
            throughput = [wrk_row(wrk, server, target, u, args.concurrency, args, args.warmup)
                          for u in (png, small, large)]
            large_c1 = wrk_row(wrk, server, target, large, 1, args, 0)  # warm: it has just served them
        finally:
            exit_status = stop_all(server)
        for row in [*throughput, large_c1]:
            row["server_exit_status"] = exit_status

        # the baselines, with the PNGs (the wrk benchmark's targets, at --concurrency)
        baseline_args = argparse.Namespace(**{**vars(args), "concurrency": [args.concurrency]})
        baselines = []
        for i, (key, name, route) in enumerate((("plain", "plain FastAPI + ORT", "/classify"),
                                                ("noop", "plain FastAPI /noop (floor)", "/noop"))):
            rows = measure_target(Target(key, name, "plain", route), baseline_args, wrk, png.wrk_dir,
                                  port_for(args.port, 10 + i), Path(f"{logs}.{key}.log"))
            baselines += [with_upload(r, png) for r in rows]

        # the fit modes, 640x480 JPEGs, one server at a time
        fits = []
        for i, fit in enumerate(args.fit_modes):
            repository = fit_repository(args.repository, args.model, fit, work / "fits")
            fit_args = argparse.Namespace(**{**vars(args), "repository": repository})
            fit_target = exitserve_target(f"exitserve_fit_{fit}", f"exitserve fit={fit}", args)
            server = start_target(fit_target, fit_args, port_for(args.port, 20 + i), Path(f"{logs}.fit_{fit}.log"))
            try:
                fits.append({"fit": fit, **against_png(accuracy(server, args, small, f"fit={fit}"), acc_png)})
            finally:
                stop_all(server)

        memory = memory_run(wrk, args, uploads, Path(f"{logs}.memory.log"))

    for row in [*acc, *fits]:
        row.pop("_correct")
    report["accuracy"] = acc
    report["fit_modes"] = fits
    report["throughput"] = throughput + baselines
    report["large"] = {"c1": large_c1, "memory": memory}
    report["ratios"] = ratios(throughput, baselines)
    report["targets"] = targets(report)
    return report


def ratios(throughput: list[dict], baselines: list[dict]) -> dict:
    rate = {r["upload"]: r["ok_per_s"] for r in throughput}
    base = {r["key"]: r["ok_per_s"] for r in baselines}

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {"jpeg_640x480_vs_png": div(rate.get(PHOTO_640[0]), rate.get(PNG[0])),
            "jpeg_4000x3000_vs_png": div(rate.get(PHOTO_4000[0]), rate.get(PNG[0])),
            "png_vs_plain": div(rate.get(PNG[0]), base.get("plain")),
            "png_vs_noop": div(rate.get(PNG[0]), base.get("noop"))}


def targets(report: dict) -> dict:
    q, acc = report["ratios"], {r["upload"]: r for r in report["accuracy"]}
    large_c1, memory = report["large"]["c1"], report["large"]["memory"]
    large_rows = [r for r in report["throughput"] if r["upload"] == PHOTO_4000[0] and r["key"] == "exitserve"]
    large_rows += [large_c1, memory["row"]]
    large_acc = acc[PHOTO_4000[0]]
    refused = sum(r["non_2xx"] for r in large_rows) + sum(sum(r["socket_errors"].values()) for r in large_rows)
    c = report["settings"]["concurrency"]

    def at_least(value: float | None, target: float) -> bool:
        return value is not None and value >= target

    out = {
        "jpeg_640x480_rate": {
            "value": q["jpeg_640x480_vs_png"], "target": JPEG_RATE_TARGET,
            "met": at_least(q["jpeg_640x480_vs_png"], JPEG_RATE_TARGET),
            "text": f"640x480 JPEG at C={c}: {_x(q['jpeg_640x480_vs_png'])} the 28x28 PNG rate "
                    f"(target >= {JPEG_RATE_TARGET}x)"},
        "jpeg_4000x3000_served": {
            "value": {"accuracy_answered_200": large_acc["answered_200"], "accuracy_images": large_acc["images"],
                      "wrk_refused_or_failed": refused},
            "target": "every request answered 200",
            "met": large_acc["answered_200"] == large_acc["images"] and refused == 0,
            "text": f"4000x3000 JPEG served: {large_acc['answered_200']}/{large_acc['images']} answered 200 by the "
                    f"client, {refused} non-2xx or socket errors under wrk"},
        "jpeg_4000x3000_p50_c1": {
            "value": large_c1["latency_ms"]["p50"], "target": LARGE_P50_TARGET_MS,
            "met": large_c1["latency_ms"]["p50"] < LARGE_P50_TARGET_MS and large_c1["ok_per_s"] > 0,
            "text": f"4000x3000 JPEG p50 at C=1: {large_c1['latency_ms']['p50']:.2f} ms "
                    f"(target < {LARGE_P50_TARGET_MS:.0f} ms)"},
        "jpeg_4000x3000_rss_growth": {
            "value": memory["growth_mb"], "target": RSS_GROWTH_TARGET_MB,
            "met": memory["growth_mb"] < RSS_GROWTH_TARGET_MB,
            "text": f"RSS growth with {memory['connections']} 4000x3000 JPEGs in flight: {memory['growth_mb']:.1f} MB "
                    f"({memory['baseline_mb']:.1f} -> peak {memory['peak_mb']:.1f} MB; target < "
                    f"{RSS_GROWTH_TARGET_MB:.0f} MB)"},
    }
    for upload in (PHOTO_640, PHOTO_4000):
        row = acc[upload[0]]
        out[f"accuracy_{upload[0]}"] = {
            "value": row["difference_points"], "target": ACCURACY_TARGET_POINTS,
            "met": abs(row["difference_points"]) <= ACCURACY_TARGET_POINTS,
            "text": f"accuracy, {upload[1]}: {100 * row['accuracy']:.2f}% against "
                    f"{100 * row['png_accuracy_same_images']:.2f}% for the 28x28 PNGs of the same {row['images']} "
                    f"images: {row['difference_points']:+.2f} points "
                    f"(target within {ACCURACY_TARGET_POINTS:.0f})"}
    out["png_vs_plain"] = {
        "value": q["png_vs_plain"], "target": PLAIN_TARGET, "met": at_least(q["png_vs_plain"], PLAIN_TARGET),
        "text": f"28x28 PNG at C={c}: {_x(q['png_vs_plain'])} the plain server (target >= {PLAIN_TARGET:.0f}x)"}
    out["png_vs_noop"] = {
        "value": q["png_vs_noop"], "target": NOOP_TARGET, "met": at_least(q["png_vs_noop"], NOOP_TARGET),
        "text": f"28x28 PNG at C={c}: {_x(q['png_vs_noop'])} the no-op route (target >= {NOOP_TARGET}x)"}
    return out


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


# --------------------------------------------------------------------------- output


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"Command: `{report['command']}`", "",
             f"Accuracy (default server, POST /classify raw body, {s['client_concurrency']} in flight; the difference "
             "is against the 28x28 PNGs of the same images):", "",
             "| upload | images | answered 200 | accuracy | 28x28 PNG, same images | difference (points) |",
             "|---|---|---|---|---|---|"]
    for r in report["accuracy"]:
        same = r.get("png_accuracy_same_images", r["accuracy"])
        diff = f"{r['difference_points']:+.2f}" if "difference_points" in r else "-"
        lines.append(f"| {r['label']} | {r['images']} | {r['answered_200']} | {100 * r['accuracy']:.2f}% | "
                     f"{100 * same:.2f}% | {diff} |")
    if report["fit_modes"]:
        lines += ["", "640x480 JPEG accuracy by the manifest's input.fit (a copy of the model folder each, "
                  "one server at a time):", "",
                  "| input.fit | images | answered 200 | accuracy | difference vs 28x28 PNG (points) |",
                  "|---|---|---|---|---|"]
        for r in report["fit_modes"]:
            lines.append(f"| {r['fit']} | {r['images']} | {r['answered_200']} | {100 * r['accuracy']:.2f}% | "
                         f"{r['difference_points']:+.2f} |")
    lines += ["", f"Throughput (wrk -t1, {s['duration']} s measured after {s['warmup']} s of the same load; the "
              f"baselines {WARMUP_S} s once; CPU % of one core, {report['cpu_count']} cores here):", "",
              "| server | upload | files | C | req/s (2xx) | non-2xx | socket errors | p50 ms | p99 ms | server CPU % "
              "| client CPU % | server CPU ms/req |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    large = report["large"]
    for r in [*report["throughput"], large["c1"], large["memory"]["row"]]:
        sock = ", ".join(f"{k}: {v}" for k, v in r["socket_errors"].items()) or "0"
        lat = r["latency_ms"]
        per = r["server_cpu_ms_per_request"]
        lines.append(f"| {r['configuration']} | {r['upload_label']} | {r['files']} | {r['concurrency']} | "
                     f"{r['ok_per_s']:.0f} | {r['non_2xx']} | {sock} | {lat['p50']:.2f} | {lat['p99']:.2f} | "
                     f"{r['server_cpu_pct']:.0f} | {r['client_cpu_pct']:.0f} | "
                     f"{'n/a' if per is None else f'{per:.3f}'} |")
    m = large["memory"]
    q = report["ratios"]
    lines += ["", f"4000x3000 JPEG memory (a fresh server warmed up with the PNGs; its process tree's RSS every "
              f"0.1 s): {m['baseline_mb']:.1f} MB before, peak {m['peak_mb']:.1f} MB with {m['connections']} in "
              f"flight, growth {m['growth_mb']:.1f} MB; {m['after_mb']:.1f} MB after.",
              "", f"Ratios (2xx req/s at C={s['concurrency']}): 640x480 JPEG / 28x28 PNG "
              f"{_x(q['jpeg_640x480_vs_png'])}; 4000x3000 JPEG / 28x28 PNG {_x(q['jpeg_4000x3000_vs_png'])}; "
              f"28x28 PNG / plain server {_x(q['png_vs_plain'])}; 28x28 PNG / no-op route {_x(q['png_vs_noop'])}."]
    g = report["generation"]
    lines += ["", "Uploads: " + "; ".join(
        f"{key}: {v['files']} files, mean {v['mean_bytes'] / 1024:.1f} KiB"
        + (f", {v['encoded']} encoded at {v['encode_ms_each']:.0f} ms each" if v.get("encoded") else "")
        for key, v in g.items()) + "."]
    lines += ["", "Targets (issue 26):"]
    lines += [f"- {'met' if t['met'] else 'MISSED'}: {t['text']}" for t in report["targets"].values()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_env(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    try:
        return monitoring.parse_env(pairs)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="model repository (folder of model folders; scripts/build_repository.sh builds it)")
    parser.add_argument("--model", default="msdnet_fmnist")
    parser.add_argument("--images", type=int, default=1000, help="test images for accuracy: 28x28 PNG and 640x480 JPEG")
    parser.add_argument("--large-images", type=int, default=200, help="test images for accuracy: 4000x3000 JPEG")
    parser.add_argument("--wrk-images", type=int, default=256, help="28x28 PNG and 640x480 JPEG files wrk cycles")
    parser.add_argument("--large-files", type=int, default=64, help="4000x3000 JPEG files wrk cycles")
    parser.add_argument("--client-concurrency", type=int, default=4, help="requests in flight, accuracy client")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections, throughput rows")
    parser.add_argument("--rss-connections", type=int, default=16, help="4000x3000 JPEGs in flight, memory row")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run")
    parser.add_argument("--warmup", type=int, default=WARMUP_S, help="seconds of unmeasured wrk load before each "
                        "exitserve row (the baselines: wrk_bench's, once)")
    parser.add_argument("--fit-modes", default=",".join(FIT_MODES),
                        help=f"comma-separated, of {', '.join(FIT_MODES)} ('' for none): 640x480 accuracy per fit")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "exitserve-photos-cache",
                        help="where the generated JPEGs are kept between runs")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the exitserve servers (default: none, the default settings)")
    parser.add_argument("--port", type=int, default=0, help="first port (0: any free port for each server)")
    parser.add_argument("--wrk-timeout", default="10s", help="wrk --timeout")
    parser.add_argument("--out", type=Path, default=Path("runs/photos26.json"))
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "-m", "exitserve.loadtest.photos",
                               *(sys.argv[1:] if argv is None else argv)])
    if min(args.images, args.large_images, args.wrk_images, args.large_files, args.client_concurrency,
           args.concurrency, args.rss_connections, args.duration) < 1 or args.warmup < 0:
        parser.error("counts, concurrencies and --duration: positive; --warmup: 0 or more")
    args.fit_modes = [f.strip() for f in args.fit_modes.split(",") if f.strip()]
    if set(args.fit_modes) - set(FIT_MODES):
        parser.error(f"--fit-modes: of {', '.join(FIT_MODES)}")
    args.server_env = parse_env(args.server_env, parser)
    args.repository = args.repository.resolve()
    if not (args.repository / args.model / "manifest.json").is_file():
        parser.error(f"{args.repository / args.model} is not a model folder (no manifest.json); "
                     "scripts/build_repository.sh builds model_repository")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = run(args)
    args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    print(f"\nwritten: {args.out}", file=sys.stderr)
    missed = [name for name, t in report["targets"].items() if not t["met"]]
    if args.check and missed:
        print(f"--check: missed {missed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
