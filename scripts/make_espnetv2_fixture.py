"""Write ``tests/data/espnetv2_reference.pt``: what the reference ESPNetv2 computes.

Builds the EdgeNets ImageNet classifier (``model/classification/espnetv2.py``) for each
width scale, fills every parameter and buffer from a seed (``seeded_state_dict`` in
``tests/support/seeded_weights.py``), runs two seeded 3x224x224 images in eval mode and
stores only the key -> shape list, the seeds and the logits, so the fixture stays a few
tens of kilobytes and the tests need neither the reference code nor its weights.

    git clone https://github.com/sacmehta/EdgeNets /tmp/EdgeNets
    python scripts/make_espnetv2_fixture.py /tmp/EdgeNets --commit "$(git -C /tmp/EdgeNets rev-parse HEAD)"
"""

from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.seeded_weights import seeded_state_dict  # noqa: E402

SCALES = (0.5, 1.0)
IMAGES = 2


def reference_logits(reference: Path, scales: tuple[float, ...], seed: int, input_seed: int) -> dict[str, dict]:
    sys.path.insert(0, str(reference))
    from model.classification.espnetv2 import EESPNet  # the reference code, not ours

    images = torch.randn(IMAGES, 3, 224, 224, generator=torch.Generator().manual_seed(input_seed))
    out: dict[str, dict] = {}
    for s in scales:
        model = EESPNet(Namespace(s=s, num_classes=1000, channels=3))
        keys_and_shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
        model.load_state_dict(seeded_state_dict(keys_and_shapes, seed), strict=True)
        with torch.no_grad():
            logits = model.eval()(images)  # N x 1000
        out[str(s)] = {"keys_and_shapes": keys_and_shapes, "logits": logits.clone()}
        print(f"s={s}: {len(keys_and_shapes)} tensors, logits std {logits.std():.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path, help="an EdgeNets checkout (sacmehta/EdgeNets)")
    parser.add_argument("--commit", default="unknown", help="the checkout's commit, recorded in the fixture")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests" / "data" / "espnetv2_reference.pt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights")
    parser.add_argument("--input-seed", type=int, default=1, help="seed of the input images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fixture = {
        "reference": f"sacmehta/EdgeNets@{args.commit} model/classification/espnetv2.py",
        "seed": args.seed,
        "input_seed": args.input_seed,
        "input_shape": [IMAGES, 3, 224, 224],
        "scales": reference_logits(args.reference.resolve(), SCALES, args.seed, args.input_seed),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
