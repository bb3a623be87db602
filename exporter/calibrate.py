"""``exitserve calibrate``: budget-aware thresholds from the held-out split.

Every exit's confidence and correctness is recorded for every held-out image (never the
test set) by running the repository's own ONNX stages. For each budget (mean cost per
image as a fraction of the full network) we keep the best held-out accuracy among

* the MSDNet reference method: exit fractions from a geometric distribution, thresholds
  read off the sorted confidences (``reference_thresholds``);
* the reference method on the network cut after exit ``j``, once the budget could run
  every image to exit ``j`` (``truncated_reference_candidates``);
* a direct search: coordinate ascent over each exit's threshold on a quantile grid,
  started from the best of those points (``search_thresholds``);
* every single exit used alone.

The reference point is the default. Leaving it (cutting the network after an earlier
exit, a single exit alone, each move of the search) is taken only when the held-out gain
is significant in a paired test: the gain in correct images must reach
``SIGNIFICANCE_Z`` standard errors, sqrt(number of images whose outcome changes),
McNemar's statistic. An unconstrained search over K-1 thresholds fits the 5,000 held-out
images' noise and lost 0.03-0.12 points on the test set against the reference method.
Ungated, cutting the network was as noisy: ESPNetv2's exit 1 alone beat the reference by
2 of 5,000 held-out images and lost 18 of 10,000 test images, putting the curve below
full depth on the test set.

Budget 1.0 is pinned to the full network (every image to the last exit), so "budget 1.0"
always means the plain, full-depth model.

The test set is only used afterwards, to report.

The data is the export's dataset unless ``--data`` names another (``image-folder:PATH``:
the images the model will actually see). Its held-out split is seeded, so a rerun picks the
same images; the calibration and the report say which dataset and how many images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from exitserve.repository.confidence import ALWAYS, DEFAULT_RULE, NEVER, ConfidenceRule
from exitserve.repository.format import (
    SERVING_FILE,
    BudgetPoint,
    Calibration,
    Manifest,
    load_manifest,
    write_budget_floor,
    write_json,
)
from exitserve.repository.runtime import StagedModel
from exitserve.exporter.exit_table import ExitTable, exit_table
from exitserve.models.data import SPLIT_SEED, DataSource, DataSplits, DatasetError, ImageDataset, resolve_data

GEOMETRIC_RATIOS = np.round(np.arange(0.02, 2.0, 0.02), 4)
QUANTILES = np.linspace(0.0, 1.0, 101)
BUDGET_POINTS = 41
SIGNIFICANCE_Z = 2.0  # standard errors of the paired difference a held-out gain must reach


@dataclass
class Candidate:
    thresholds: np.ndarray
    accuracy: float
    cost: float
    method: str

    def better_than(self, other: "Candidate | None") -> bool:
        """Higher held-out accuracy wins; at equal accuracy the one spending more of the
        budget does (more compute generalizes at least as well to unseen images)."""
        if other is None:
            return True
        return (self.accuracy, self.cost) > (other.accuracy, other.cost)


def significantly_better(table: ExitTable, challenger: Candidate, incumbent: Candidate) -> bool:
    """McNemar-style paired test on the held-out images: only the images whose
    correctness differs between the two threshold sets carry evidence."""
    new, old = table.correct_per_image(challenger.thresholds), table.correct_per_image(incumbent.thresholds)
    gain = int(new.sum()) - int(old.sum())
    changed = int((new != old).sum())
    if changed == 0:  # same answers everywhere: prefer spending more of the budget
        return challenger.cost > incumbent.cost
    return gain > 0 and gain >= SIGNIFICANCE_Z * np.sqrt(changed)


def gated_choice(table: ExitTable, default: Candidate, challengers: list[Candidate | None]) -> Candidate:
    """``default`` unless a challenger is better on held-out data by a significant margin
    (``significantly_better``); challengers are tried in turn against the current choice."""
    chosen = default
    for challenger in challengers:
        if challenger is None or not challenger.better_than(chosen):
            continue
        if significantly_better(table, challenger, chosen):
            chosen = challenger
    return chosen


def reference_thresholds(table: ExitTable, exit_fractions: np.ndarray) -> np.ndarray:
    """The MSDNet reference's rule: walking the exits in order, exit k takes the
    ``floor(n * p_k)`` most confident images not yet taken; its threshold is the
    confidence of the last one it takes."""
    k_exits, n = table.conf.shape
    taken = np.zeros(n, dtype=bool)
    thresholds = np.full(k_exits, NEVER)
    for k in range(k_exits - 1):
        want = int(np.floor(n * exit_fractions[k]))
        order = np.argsort(-table.conf[k], kind="stable")
        available = order[~taken[order]]
        if want >= 1 and len(available) >= want:
            thresholds[k] = table.conf[k, available[want - 1]]
        taken |= table.conf[k] >= thresholds[k]
    thresholds[-1] = ALWAYS
    return thresholds


def geometric_fractions(ratio: float, k_exits: int) -> np.ndarray:
    p = ratio ** np.arange(1, k_exits + 1, dtype=np.float64)
    return p / p.sum()


def reference_candidates(table: ExitTable) -> list[Candidate]:
    out = []
    for ratio in GEOMETRIC_RATIOS:
        t = reference_thresholds(table, geometric_fractions(float(ratio), table.num_exits))
        acc, cost, _ = table.evaluate(t)
        out.append(Candidate(t, acc, cost, "reference"))
    return out


def truncated_reference_candidates(table: ExitTable) -> dict[int, list[Candidate]]:
    """Per exit ``j`` before the last: the reference rule on the network cut after exit
    ``j`` (exit ``j`` takes every image left, later exits never run). A late exit
    significantly worse than an earlier one is then skipped, which the reference rule,
    always ending at the last exit, cannot do."""
    out: dict[int, list[Candidate]] = {}
    k_exits = table.num_exits
    for j in range(1, k_exits - 1):
        head = ExitTable(table.conf[: j + 1], table.correct[: j + 1], table.costs[: j + 1])
        out[j] = []
        for ratio in GEOMETRIC_RATIOS:
            t = np.full(k_exits, ALWAYS)
            t[: j + 1] = reference_thresholds(head, geometric_fractions(float(ratio), j + 1))
            acc, cost, _ = table.evaluate(t)
            out[j].append(Candidate(t, acc, cost, "reference_truncated"))
    return out


def static_candidates(table: ExitTable) -> list[Candidate]:
    out = []
    for k in range(table.num_exits):
        t = table.static(k)
        acc, cost, _ = table.evaluate(t)
        out.append(Candidate(t, acc, cost, "static"))
    return out


def threshold_grid(table: ExitTable) -> list[np.ndarray]:
    """Per exit: confidence quantiles plus 'never leave here'."""
    return [np.unique(np.append(np.quantile(table.conf[k], QUANTILES), NEVER)) for k in range(table.num_exits - 1)]


def search_thresholds(table: ExitTable, budget: float, start: Candidate, grid: list[np.ndarray], rounds: int = 4) -> Candidate:
    """Coordinate ascent: per exit, the best feasible threshold on the grid replaces the
    current one when it is significantly better (``significantly_better``)."""
    best = start
    for _ in range(rounds):
        improved = False
        for k in range(table.num_exits - 1):
            top: Candidate | None = None
            for value in grid[k]:
                t = best.thresholds.copy()
                t[k] = value
                acc, cost, _ = table.evaluate(t)
                trial = Candidate(t, acc, cost, "search")
                if cost <= budget + 1e-12 and trial.better_than(top):
                    top = trial
            if top is not None and top.better_than(best) and significantly_better(table, top, best):
                best, improved = top, True
        if not improved:
            break
    return best


def best_within(candidates: list[Candidate], budget: float) -> Candidate | None:
    best = None
    for c in candidates:
        if c.cost <= budget + 1e-12 and c.better_than(best):
            best = c
    return best


def budget_grid(costs: np.ndarray, points: int = BUDGET_POINTS) -> np.ndarray:
    return np.unique(np.concatenate([np.linspace(costs[0], 1.0, points), costs]))


def atc_threshold(scores: np.ndarray, accuracy: float) -> float:
    """ATC's threshold (Garg et al., "Leveraging Unlabeled Data to Predict Out-of-Distribution
    Performance", ICLR 2022): the score above which the share of ``scores`` equals
    ``accuracy``. Live, the share of recent images scoring above it estimates the accuracy
    without labels; on held-out images it reproduces the held-out accuracy by construction."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(ordered)
    above = int(round(accuracy * n))
    if above >= n:
        return float(ordered[0] - 1.0)  # every image counts as right
    # strictly above the (n - above)-th smallest: exactly ``above`` images, barring ties
    return float(ordered[n - above - 1])


def budget_curve(table: ExitTable, progress: bool = False) -> tuple[list[BudgetPoint], dict[str, list[Candidate]]]:
    """The best thresholds per budget; also returns each method's own pick per budget."""
    references = reference_candidates(table)
    truncated = truncated_reference_candidates(table)
    statics = static_candidates(table)
    grid = threshold_grid(table)
    curve: list[BudgetPoint] = []
    picks: dict[str, list[Candidate]] = {"reference": [], "search": []}
    previous: Candidate | None = None
    for budget in tqdm(budget_grid(table.costs), desc="calibrate budgets", disable=not progress, leave=False):
        static = best_within(statics, budget)
        ref = best_within(references, budget) or static
        # cutting the network after exit j is an option once the budget could run every image to j
        affordable_cuts = [c for j, family in truncated.items() if budget >= table.costs[j] - 1e-12 for c in family]
        start = gated_choice(table, ref, [best_within(affordable_cuts, budget), static])
        search = search_thresholds(table, budget, start, grid)
        picks["reference"].append(ref)
        picks["search"].append(search)
        chosen = search
        if previous is not None and previous.better_than(chosen):
            chosen = previous  # a larger budget never does worse than a smaller one
        if budget >= 1.0 - 1e-12:
            chosen = statics[-1]  # budget 1.0 means the full network, the baseline everything compares to
        previous = chosen
        _, _, fractions = table.evaluate(chosen.thresholds)
        atc = atc_threshold(table.served_scores(chosen.thresholds), chosen.accuracy) if table.score is not None else None
        curve.append(
            BudgetPoint(
                budget=float(budget), thresholds=[float(v) for v in chosen.thresholds],
                method=chosen.method, expected_accuracy=chosen.accuracy, expected_cost=chosen.cost,
                exit_fractions=[float(f) for f in fractions], atc_threshold=atc,
            )
        )
    return curve, picks


def calibrate(staged: StagedModel, data: ImageDataset, rule: ConfidenceRule = DEFAULT_RULE,
              progress: bool = True, dataset: str | None = None) -> tuple[Calibration, dict[str, list[Candidate]]]:
    """The budget curve of ``staged`` on ``data`` (the held-out split, in the CLI). The
    calibration records the dataset (``dataset``, as ``--data`` names it; by default the
    manifest's) and the split it was given, so calibrating on the test set shows."""
    manifest = staged.manifest
    held = exit_table(staged, manifest, data, rule)
    curve, picks = budget_curve(held, progress)
    calibration = Calibration(
        rule=rule,
        heldout={"dataset": dataset or manifest.source.dataset, "split": data.split, "images": len(data),
                 "seed": SPLIT_SEED},
        exit_accuracy=[float(a) for a in held.correct.mean(axis=1)],
        cost_fractions=[float(c) for c in held.costs],
        curve=curve,
    )
    return calibration, picks


def calibration_data(manifest: Manifest, data: str | None = None,
                     data_dir: str | None = None) -> tuple[DataSource, DataSplits]:
    """The dataset to calibrate on: ``data`` (``--data``: the images the model will see,
    e.g. ``image-folder:PATH``), else the one the export recorded; its images at the
    model's size and channels. Its classes must be the model's outputs, in number."""
    source = resolve_data(data, data_dir, default=manifest.source.dataset)
    if source is None:
        raise DatasetError(f"{manifest.name} was exported without a dataset: name the images to calibrate on "
                           "with --data (fashion-mnist, cifar10:PATH, cifar100:PATH, image-folder:PATH)")
    splits = source.load(manifest.input.size, manifest.input.channels, manifest.input.geometry)
    sample = splits.holdout
    if (sample.size, sample.channels) != (manifest.input.size, manifest.input.channels):
        raise DatasetError(f"{source} has {sample.size} x {sample.size} images with {sample.channels} channels; "
                           f"{manifest.name} takes {manifest.input.size} x {manifest.input.size} with "
                           f"{manifest.input.channels}")
    if len(sample.classes) != len(manifest.labels):
        raise DatasetError(f"{source} has {len(sample.classes)} classes; {manifest.name} has {len(manifest.labels)} "
                           "labels")
    return source, splits


def calibrate_repository(folder: str | Path, *, rule: ConfidenceRule = DEFAULT_RULE, data: str | None = None,
                         data_dir: str | None = None, report: bool = True,
                         progress: bool = True) -> tuple[Calibration, dict | None]:
    """``exitserve calibrate``: calibrate on the held-out split of ``data`` (by default the
    dataset the export recorded), write ``calibration.json``, then (with ``report``)
    evaluate every point on the test set. The held-out split is seeded
    (``models.data.holdout_split``): the same images on every run."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    staged = StagedModel(folder, manifest)
    source, splits = calibration_data(manifest, data, data_dir)
    calibration, picks = calibrate(staged, splits.holdout, rule, progress, dataset=str(source))
    write_json(folder / "calibration.json", calibration)
    if floor := write_budget_floor(folder, manifest):
        print(f"{folder.name}: its first exit costs more than the server's default budget: wrote "
              f"{SERVING_FILE} with default_budget {floor.default_budget}")
    test_report = None
    if report:
        from exitserve.exporter.report import build_test_report, write_report

        test = exit_table(staged, manifest, splits.test, rule)
        test_report = build_test_report(manifest.name, calibration, picks, test, splits.test.split)
        write_report(folder, test_report)
    return calibration, test_report
