"""Model quality on a live server with the committed model: the label-free estimate follows
the true accuracy on real images and drops when the images change; delayed labels score
remembered answers; the shadow runs; every signal reaches /v1/models and /metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from exitserve.server.settings import Settings
from tests.support.images import encode, fashion_images
from tests.support.live import live_server
from tests.support.processes import eventually

MODEL = "msdnet_fmnist"
WINDOW = 200
LABEL_MEMORY = 30


def classify(client: httpx.Client, images: np.ndarray) -> list[tuple[str, int]]:
    """(request id, answered class) per image, one /classify each."""
    answered = []
    for image in images:
        response = client.post("/classify", content=encode(image), headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        answered.append((response.headers["x-request-id"], response.json()["class_index"]))
    return answered


def monitoring(client: httpx.Client) -> dict:
    return client.get(f"/v1/models/{MODEL}").json()["monitoring"]


@pytest.fixture(scope="module")
def served(served_repository: Path):
    settings = Settings(model_repository=served_repository, monitor_window=WINDOW, monitor_min_images=100,
                        label_memory=LABEL_MEMORY, shadow_share=1.0, shadow_max_cost_share=1.0)
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def test_the_estimate_follows_the_truth_and_falls_when_the_images_change(served: httpx.Client) -> None:
    images, labels = fashion_images(WINDOW)
    answered = classify(served, images)
    truth = np.mean([c == label for (_, c), label in zip(answered, labels)])
    clean = monitoring(served)
    assert clean["estimates"] and clean["window_images"] == WINDOW
    assert abs(clean["estimated_accuracy"] - truth) < 0.08
    assert clean["calibrated_accuracy"] > 0.9
    assert not clean["alerts"]["accuracy_drop"] and not clean["alerts"]["exit_drift"]
    assert clean["exit_drift"] < clean["thresholds"]["exit_drift"]

    inverted = classify(served, 255 - images)  # light garments on black became dark ones on white
    inverted_truth = np.mean([c == label for (_, c), label in zip(inverted, labels)])
    shifted = monitoring(served)
    assert inverted_truth < truth - 0.3
    assert shifted["estimated_accuracy"] < clean["estimated_accuracy"] - 0.2
    assert shifted["alerts"]["accuracy_drop"]
    assert shifted["calibrated_accuracy"] == pytest.approx(clean["calibrated_accuracy"], abs=0.02)  # the promise stayed

    summary = served.get("/v1/models").json()["models"][0]
    assert summary["estimated_accuracy"] == pytest.approx(shifted["estimated_accuracy"], abs=0.05)
    assert summary["expected_accuracy_basis"] == "calibration"
    metrics = served.get("/metrics").text
    for name in ("exitserve_estimated_accuracy", "exitserve_calibrated_accuracy", "exitserve_exit_drift",
                 'exitserve_alert_threshold{alert="accuracy_drop",model="msdnet_fmnist"} 0.05'):
        assert name in metrics


def test_delayed_labels_score_the_remembered_answers(served: httpx.Client) -> None:
    images, labels = fashion_images(LABEL_MEMORY + 5)
    answered = classify(served, images)
    recent = list(zip(answered, labels))[5:]
    body = {"labels": [{"request_id": rid, "label": int(label)} for (rid, _), label in recent]
            + [{"request_id": answered[0][0], "label": int(labels[0])},  # forgotten: 35 answers ago
               {"request_id": "never-sent", "label": 1},
               {"request_id": answered[-1][0], "label": "Trouser"},  # the second label of that image
               {"request_id": answered[-2][0], "label": 1, "image": 3}]}
    response = served.post(f"/v1/models/{MODEL}/labels", json=body)
    assert response.status_code == 200, response.text
    report = response.json()
    right = sum(c == label for (_, c), label in recent)
    assert report["matched"] == LABEL_MEMORY and report["correct"] == right
    assert report["expired"] == [answered[0][0]] and report["unknown"] == ["never-sent"]
    assert [i["request_id"] for i in report["invalid"]] == [answered[-1][0], answered[-2][0]]
    assert "already labelled" in report["invalid"][0]["error"] and "no image 3" in report["invalid"][1]["error"]
    assert report["labelled_accuracy"] == pytest.approx(right / LABEL_MEMORY)
    assert f'exitserve_labelled_accuracy{{model="{MODEL}"}}' in served.get("/metrics").text
    assert monitoring(served)["labelled"] == {"images": LABEL_MEMORY, "accuracy": pytest.approx(right / LABEL_MEMORY)}


def test_labels_by_class_name_and_for_a_batchs_images(served: httpx.Client) -> None:
    images, labels = fashion_images(2)
    files = [("files", ("a.png", encode(images[0]), "image/png")), ("files", ("bad.png", b"not a png", "image/png")),
             ("files", ("b.png", encode(images[1]), "image/png"))]
    response = served.post("/classify/batch", files=files)
    assert response.status_code == 200
    batch = response.json()
    assert batch["summary"]["expected_accuracy_basis"] == "calibration"
    assert 0 < batch["summary"]["estimated_accuracy"] <= 1
    request_id = response.headers["x-request-id"]
    names = served.get(f"/v1/models/{MODEL}").json()["manifest"]["labels"]
    report = served.post(f"/v1/models/{MODEL}/labels", json={"labels": [
        {"request_id": request_id, "label": names[labels[0]], "image": 0},
        {"request_id": request_id, "label": 0, "image": 1},
        {"request_id": request_id, "label": "Spaceship", "image": 2},  # refused: the image stays unlabelled
        {"request_id": request_id, "label": int(labels[1]), "image": 2}]}).json()
    assert report["matched"] == 2
    assert report["correct"] == sum(batch["results"][i]["result"]["class_index"] == int(labels[j])
                                    for i, j in ((0, 0), (2, 1)))
    assert "was not classified" in report["invalid"][0]["error"] and "Spaceship" in report["invalid"][1]["error"]


@pytest.mark.parametrize("body", [{"labels": []}, {"labels": [{"label": 1}]}, {"labels": [{"request_id": "a"}]},
                                  {"labels": [{"request_id": "a", "label": 1.5}]},
                                  {"labels": [{"request_id": "a", "label": 1, "image": -1}]}, [1, 2]])
def test_malformed_labels_are_refused_with_a_json_4xx(served: httpx.Client, body: object) -> None:
    response = served.post(f"/v1/models/{MODEL}/labels", json=body)
    assert response.status_code == 422 and response.json()["error"]


def test_labels_for_an_unknown_model_are_404(served: httpx.Client) -> None:
    response = served.post("/v1/models/nope/labels", json={"labels": [{"request_id": "a", "label": 1}]})
    assert response.status_code == 404 and response.json()["error"] == "unknown_model"


def test_the_shadow_runs_and_its_cost_is_counted(served: httpx.Client) -> None:
    images, _ = fashion_images(60)
    classify(served, images)
    shadow = eventually(lambda: (s := monitoring(served)["shadow"])["agreement"] is not None and s, 30,
                        "twenty shadowed images")
    assert shadow["images"] >= 20 and shadow["cost"] > 0 and shadow["agreement"] > 0.8
    metrics = served.get("/metrics").text
    assert f'exitserve_shadow_cost_fraction_total{{model="{MODEL}"}}' in metrics
    assert f'exitserve_shadow_agreement{{model="{MODEL}"}}' in metrics
