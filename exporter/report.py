"""The test-set report of a calibration: JSON and a PNG plot of accuracy versus cost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from exitserve.repository.format import Calibration
from exitserve.exporter.exit_table import ExitTable


def build_test_report(name: str, calibration: Calibration, picks: dict, test: ExitTable, split: str) -> dict:
    """Every calibrated point (and each method's own pick) measured on ``test``."""
    def measured(thresholds) -> dict:
        acc, cost, fractions = test.evaluate(np.asarray(thresholds))
        return {"accuracy": acc, "cost": cost, "exit_fractions": fractions.round(4).tolist()}

    def estimated(point) -> float | None:
        """The label-free estimate (ATC) on the test images: what the server would report."""
        if point.atc_threshold is None or test.score is None:
            return None
        return float((test.served_scores(np.asarray(point.thresholds)) > point.atc_threshold).mean())

    curve = []
    for point, ref, search in zip(calibration.curve, picks["reference"], picks["search"]):
        curve.append({
            "budget": point.budget,
            "method": point.method,
            "thresholds": point.thresholds,
            "expected_accuracy": point.expected_accuracy,
            "expected_cost": point.expected_cost,
            "test": measured(point.thresholds) | {"estimated_accuracy": estimated(point)},
            "reference_test": measured(ref.thresholds),
            "search_test": measured(search.thresholds),
        })
    statics = []
    for k in range(test.num_exits):
        acc, cost, _ = test.evaluate(test.static(k))
        statics.append({"exit": k, "accuracy": acc, "cost": cost})
    oracle_acc, oracle_cost = test.oracle()
    return {
        "model": name,
        "rule": calibration.rule,
        "split": split,
        "images": test.num_images,
        "heldout": calibration.heldout,  # what the thresholds were fitted on
        "curve": curve,
        "static_exits": statics,
        "oracle": {"accuracy": oracle_acc, "cost": oracle_cost},
    }


def write_report(folder: Path, report: dict) -> None:
    (folder / "calibration_report.json").write_text(json.dumps(report, indent=2))
    plot_curves({report["model"]: report}, folder / "calibration_report.png")


def plot_curves(reports: dict[str, dict], path: Path) -> None:
    """Accuracy (%) versus mean cost (fraction of the full network), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(6.4 * len(reports), 4.6), squeeze=False)
    for ax, (name, rep) in zip(axes[0], reports.items()):
        curve = rep["curve"]
        ax.plot([p["test"]["cost"] for p in curve], [100 * p["test"]["accuracy"] for p in curve],
                "-o", ms=3, label="early exit (chosen)")
        ax.plot([p["reference_test"]["cost"] for p in curve], [100 * p["reference_test"]["accuracy"] for p in curve],
                "--", lw=1, label="reference method (geometric)")
        statics = rep["static_exits"]
        ax.plot([s["cost"] for s in statics], [100 * s["accuracy"] for s in statics], "s", label="single exit")
        ax.plot([rep["oracle"]["cost"]], [100 * rep["oracle"]["accuracy"]], "*", ms=12, label="oracle")
        final = 100 * statics[-1]["accuracy"]
        ax.axhline(final - 0.3, color="grey", lw=0.7, ls=":", label="final exit - 0.3 pt")
        lowest = min(100 * s["accuracy"] for s in statics)
        ax.set_ylim(max(0.0, lowest - 1.0), max(100 * rep["oracle"]["accuracy"], final) + 0.5)
        ax.set_xlabel("mean cost per image (fraction of full network)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name} ({rep['rule']}, {rep['images']} test images)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
