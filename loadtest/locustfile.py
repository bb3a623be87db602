"""Locust scenarios for exitserve. Headless and bounded, e.g.:

    locust -f loadtest/locustfile.py --headless -u 16 -r 8 -t 60s --host http://127.0.0.1:8000

Users (equal weights, so ``-u`` at least the number of classes runs every one):

* ``ClassifyUser``: one image per request, raw body or multipart, at the server's default budget;
* ``CheapUser``: the same at budget 0.15;
* ``FullDepthUser``: the same at budget 1.0, every answer must come from the full network
  (``exit.cost_fraction`` 1.0);
* ``DeadlineUser``: the same with ``deadline_ms`` (50), every answer must say whether the
  deadline cut it short (``exit.deadline_hit``) and how long it took (``timings_ms.total``),
  and take at most 10 x the deadline + 500 ms on the server;
* ``BatchUser``: batches of ``EXITSERVE_LOAD_BATCH`` images on /classify/batch, one result
  per upload, within the batch's budget.

A request fails when its status is not 200 or its answer is malformed. A wrong class is no
failure (a classifier makes mistakes) but every answer is checked against the image's
Fashion-MNIST label: per user class, the share of correct answers (batch: of images) is
printed when the test stops, written to ``<--csv prefix>_accuracy.csv`` and, when
``EXITSERVE_LOAD_REPORT`` names a file, to that file as JSON. Accuracy stays out of
Locust's request statistics, so requests/s and the Aggregated row count HTTP requests only.
Every request name starts with its URL path (``/classify (raw, budget 0.15)``).

Environment: ``EXITSERVE_LOAD_BUDGET`` (budget sent with each request by every user,
overriding the user classes' own; default: theirs, the server's for ``ClassifyUser`` and
``BatchUser``), ``EXITSERVE_LOAD_IMAGES`` (how many Fashion-MNIST test images to cycle,
512), ``EXITSERVE_LOAD_BATCH`` (images per /classify/batch request, 32),
``EXITSERVE_LOAD_DEADLINE_MS`` (``DeadlineUser``'s deadline, 50), ``EXITSERVE_LOAD_REPORT``
(JSON accuracy report path, none by default).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, tag, task
from locust.env import Environment
from locust.runners import WorkerRunner

from exitserve.loadtest.images import encoded_test_images


def _encoded_test_images(count: int) -> list[tuple[bytes, int]]:
    blobs, labels = encoded_test_images(count)
    return [(blob, int(label)) for blob, label in zip(blobs, labels)]


def _budget_from_env(raw: str | None) -> float | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        budget = float(raw)
    except ValueError:
        raise ValueError(f"EXITSERVE_LOAD_BUDGET must be a number in (0, 1], got {raw!r}") from None
    if not 0 < budget <= 1:
        raise ValueError(f"EXITSERVE_LOAD_BUDGET must be in (0, 1], got {raw!r}")
    return budget


IMAGES = _encoded_test_images(int(os.environ.get("EXITSERVE_LOAD_IMAGES", "512")))
BUDGET = _budget_from_env(os.environ.get("EXITSERVE_LOAD_BUDGET"))
BATCH = int(os.environ.get("EXITSERVE_LOAD_BATCH", "32"))
DEADLINE_MS = float(os.environ.get("EXITSERVE_LOAD_DEADLINE_MS", "50"))
REPORT = os.environ.get("EXITSERVE_LOAD_REPORT")
NUM_CLASSES = 10  # Fashion-MNIST
COST_TOLERANCE = 1e-5  # the server rounds costs to 6 decimals


# ---------------------------------------------------------------------------- accuracy


class Accuracy:
    """Answers and correct answers per user class. Workers send theirs to the master with
    each stats report (then start from zero); the master or a local run reports the sum."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}  # user class -> [answers, correct]
        self.changed = False

    def add(self, user_class: str, answers: int, correct: int) -> None:
        entry = self.counts.setdefault(user_class, [0, 0])
        entry[0] += answers
        entry[1] += correct
        self.changed = True

    def take(self) -> dict[str, list[int]]:
        counts, self.counts = self.counts, {}
        return counts

    def summary(self) -> dict[str, dict[str, Any]]:
        return {name: {"answers": n, "correct": c, "accuracy": c / n if n else None}
                for name, (n, c) in sorted(self.counts.items())}


ACCURACY = Accuracy()


@events.report_to_master.add_listener
def _send_accuracy(client_id: str, data: dict, **_: Any) -> None:
    data["exitserve_accuracy"] = ACCURACY.take()


@events.worker_report.add_listener
def _receive_accuracy(client_id: str, data: dict, **_: Any) -> None:
    for name, (answers, correct) in data.get("exitserve_accuracy", {}).items():
        ACCURACY.add(name, answers, correct)


def _publish(environment: Environment, final: bool) -> None:
    """Print the accuracy lines and write the CSV / JSON reports (not on a worker)."""
    if isinstance(environment.runner, WorkerRunner) or (final and not ACCURACY.changed):
        return
    ACCURACY.changed = False
    summary = ACCURACY.summary()
    for name, s in summary.items():
        accuracy = "n/a" if s["accuracy"] is None else f"{s['accuracy']:.4f}"
        print(f"accuracy {name}: {accuracy} ({s['correct']}/{s['answers']} answers correct)", flush=True)
    options = environment.parsed_options
    prefix = getattr(options, "csv_prefix", None) if options is not None else None
    if prefix:
        with open(f"{prefix}_accuracy.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["User Class", "Answers", "Correct", "Accuracy"])
            for name, s in summary.items():
                writer.writerow([name, s["answers"], s["correct"], "" if s["accuracy"] is None else s["accuracy"]])
    if REPORT:
        Path(REPORT).write_text(json.dumps({"accuracy": summary}, indent=2) + "\n")


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    ACCURACY.counts.clear()  # a new test in the web UI starts from zero, as Locust's statistics do
    ACCURACY.changed = False


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    _publish(environment, final=False)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    _publish(environment, final=True)  # again only if late worker reports changed the counts


# ---------------------------------------------------------------------------- answers


class Malformed(Exception):
    """The answer is not what the API promises."""


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Malformed(f"{what} is not a finite number: {value!r}")
    return float(value)


def _classification(answer: Any, what: str = "answer") -> dict:
    """The class part of an answer (of /classify, or one batch result), checked; returns ``exit``."""
    if not isinstance(answer, dict):
        raise Malformed(f"{what} is not a JSON object")
    index = answer.get("class_index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < NUM_CLASSES:
        raise Malformed(f"{what}: class_index {index!r} is not a class")
    if not isinstance(answer.get("label"), str) or not answer["label"]:
        raise Malformed(f"{what}: no label")
    if not 0 <= _number(answer.get("confidence"), f"{what}: confidence") <= 1:
        raise Malformed(f"{what}: confidence {answer['confidence']} is not a probability")
    exit_info = answer.get("exit")
    if not isinstance(exit_info, dict):
        raise Malformed(f"{what}: no exit")
    for key in ("index", "stages_run"):
        if isinstance(exit_info.get(key), bool) or not isinstance(exit_info.get(key), int):
            raise Malformed(f"{what}: exit.{key} is not an integer")
    if not 0 < _number(exit_info.get("cost_fraction"), f"{what}: exit.cost_fraction") <= 1 + COST_TOLERANCE:
        raise Malformed(f"{what}: exit.cost_fraction {exit_info['cost_fraction']} is not in (0, 1]")
    return exit_info


class CheckedUser(HttpUser):
    """Checks every answer, counts correct classes; subclasses set the request options."""

    abstract = True
    budget: float | None = None  # None: the server's default
    deadline_ms: float | None = None

    @property
    def effective_budget(self) -> float | None:
        return BUDGET if BUDGET is not None else self.budget

    def options(self) -> dict[str, str]:
        options = {}
        if self.effective_budget is not None:
            options["budget"] = repr(self.effective_budget)
        if self.deadline_ms is not None:
            options["deadline_ms"] = repr(self.deadline_ms)
        return options

    def describe(self, variant: str) -> str:
        """Request name: the URL path first, then the variant and the options sent."""
        parts = [variant] if variant else []
        if self.effective_budget is not None:
            parts.append(f"budget {self.effective_budget}")
        if self.deadline_ms is not None:
            parts.append(f"deadline {self.deadline_ms:g} ms")
        return ", ".join(parts)

    def count(self, answers: int, correct: int) -> None:
        ACCURACY.add(type(self).__name__, answers, correct)

    def checked_json(self, response) -> Any:
        if response.status_code != 200:
            raise Malformed(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError:
            raise Malformed(f"not JSON: {response.text[:200]!r}") from None

    def check_budget_echo(self, answer: dict) -> None:
        sent = self.effective_budget
        if sent is not None and (answer.get("budget") is None
                                 or abs(_number(answer["budget"], "budget") - sent) > COST_TOLERANCE):
            raise Malformed(f"budget {answer.get('budget')!r} in the answer, {sent} sent")


class ClassifyUser(CheckedUser):
    """One image per request, on the raw-body fast path or as multipart."""

    wait_time = between(0.0, 0.01)

    def check(self, answer: Any, label: int) -> None:
        """Raises ``Malformed``; otherwise counts the answer. Subclasses add their checks."""
        self.check_single(answer)
        self.count(1, int(answer["class_index"] == label))

    def check_single(self, answer: Any) -> dict:
        exit_info = _classification(answer)
        self.check_budget_echo(answer)
        timings = answer.get("timings_ms")
        if not isinstance(timings, dict):
            raise Malformed("no timings_ms")
        _number(timings.get("total"), "timings_ms.total")
        if self.effective_budget == 1.0 and abs(exit_info["cost_fraction"] - 1.0) > COST_TOLERANCE:
            raise Malformed(f"budget 1.0 answered from exit {exit_info['index']} "
                            f"at cost {exit_info['cost_fraction']}, not the full network")
        return exit_info

    def _classify(self, variant: str) -> None:
        data, label = random.choice(IMAGES)
        if variant == "raw":
            body: dict[str, Any] = {"data": data, "headers": {"content-type": "image/png"}}
        else:
            body = {"files": {"file": ("img.png", data, "image/png")}}
        with self.client.post("/classify", params=self.options(), name=f"/classify ({self.describe(variant)})",
                              catch_response=True, **body) as response:
            try:
                self.check(self.checked_json(response), label)
            except Malformed as problem:
                response.failure(str(problem))

    @tag("single")
    @task(8)
    def classify_raw(self) -> None:
        self._classify("raw")

    @tag("single")
    @task(2)
    def classify_multipart(self) -> None:
        self._classify("multipart")


class CheapUser(ClassifyUser):
    """Single images at a low budget: mostly the first exits."""

    budget = 0.15


class FullDepthUser(ClassifyUser):
    """Single images at budget 1.0: every answer from the full network."""

    budget = 1.0


class DeadlineUser(ClassifyUser):
    """Single images with a deadline: the answer says whether it cut the run short."""

    deadline_ms = DEADLINE_MS

    def check(self, answer: Any, label: int) -> None:
        exit_info = self.check_single(answer)
        if not isinstance(exit_info.get("deadline_hit"), bool):
            raise Malformed(f"exit.deadline_hit is not a bool: {exit_info.get('deadline_hit')!r}")
        total = answer["timings_ms"]["total"]
        slack = 10 * self.deadline_ms + 500
        if total > slack:
            raise Malformed(f"{total:.0f} ms on the server for a {self.deadline_ms:g} ms deadline "
                            f"(allowed {slack:.0f} ms)")
        self.count(1, int(answer["class_index"] == label))


class BatchUser(CheckedUser):
    """Budgeted batches of ``EXITSERVE_LOAD_BATCH`` images."""

    wait_time = between(0.05, 0.2)
    weight = 1

    @tag("batch")
    @task
    def classify_batch(self) -> None:
        chosen = random.sample(IMAGES, min(BATCH, len(IMAGES)))
        files = [("files", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(chosen)]
        variant = self.describe("")
        with self.client.post("/classify/batch", files=files, data=self.options(), catch_response=True,
                              name="/classify/batch" + (f" ({variant})" if variant else "")) as response:
            try:
                self.check(self.checked_json(response), [label for _, label in chosen])
            except Malformed as problem:
                response.failure(str(problem))

    def check(self, answer: Any, labels: list[int]) -> None:
        if not isinstance(answer, dict) or not isinstance(answer.get("results"), list):
            raise Malformed("no results list")
        results = answer["results"]
        if len(results) != len(labels):
            raise Malformed(f"{len(results)} results for {len(labels)} uploads: one result per image expected")
        correct = 0
        for i, (item, label) in enumerate(zip(results, labels)):
            if not isinstance(item, dict) or item.get("index") != i or item.get("filename") != f"{i}.png":
                raise Malformed(f"result {i} is not the answer for upload {i}.png")
            if item.get("error") is not None or item.get("result") is None:
                raise Malformed(f"upload {i}.png: {item.get('error')}: {item.get('detail')}")
            _classification(item["result"], f"result {i}")
            correct += item["result"]["class_index"] == label
        summary = answer.get("summary")
        if not isinstance(summary, dict):
            raise Malformed("no summary")
        mean_cost = _number(summary.get("mean_cost_fraction"), "summary.mean_cost_fraction")
        budget = _number(summary.get("budget"), "summary.budget")
        if mean_cost > budget + COST_TOLERANCE:
            raise Malformed(f"mean cost {mean_cost} over the batch's budget {budget}")
        self.check_budget_echo(summary)
        self.count(len(labels), correct)
