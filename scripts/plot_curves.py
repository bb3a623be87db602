"""Draw every calibrated model's test-set budget curve side by side in one PNG.

    python scripts/plot_curves.py model_repository docs/calibration_all_families.png

Reads each model folder's ``calibration_report.json`` (written by ``exitserve calibrate``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exitserve.exporter.report import plot_curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    reports = {
        folder.name: json.loads((folder / "calibration_report.json").read_text())
        for folder in sorted(args.repository.iterdir())
        if (folder / "calibration_report.json").is_file()
    }
    if not reports:
        raise SystemExit(f"no calibration_report.json under {args.repository}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(reports, args.out)
    print(f"wrote {args.out}: {', '.join(reports)}")


if __name__ == "__main__":
    main()
