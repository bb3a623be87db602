"""The ``exitserve`` command. Each subcommand imports its package lazily, so ``serve``
never pulls in PyTorch and ``--help`` stays fast: building the options imports only
torch-free modules (the training config, the repository contract).

A user's mistake (a missing file, a bad option) is an ``ExitserveError``: its message on one
line and exit status 2. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from exitserve.errors import ConfigurationError, ExitserveError

if TYPE_CHECKING:
    from exitserve.models.checkpoint import ExitRecord

_CHECKOUT = Path(__file__).resolve().parents[1]
# the committed default model: beside the package in a checkout, else relative to the cwd
DEFAULT_CHECKPOINT = str(
    _CHECKOUT / "models/weights/msdnet_fmnist.pt"
    if (_CHECKOUT / "models/weights/msdnet_fmnist.pt").is_file()
    else Path("models/weights/msdnet_fmnist.pt")
)


def _json_dict(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _add_train(sub: argparse._SubParsersAction) -> None:
    from exitserve.models.train_config import TrainConfig  # not models.train: that imports torch

    d = TrainConfig()
    p = sub.add_parser("train", help="train a multi-exit model with the joint exit loss")
    p.add_argument("--model", default=d.model, help="registered model name (see `exitserve models`)")
    p.add_argument("--dataset", default=d.dataset, choices=["fashion-mnist", "cifar10", "cifar100", "image-folder"])
    p.add_argument("--data-dir", default=None, help="dataset folder (default for fashion-mnist: Debian's)")
    p.add_argument("--out", default=d.out, help="checkpoint path; PATH.resume holds the resume state")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--exit-weights", type=_float_list, default=None, help="comma-separated, one per exit")
    p.add_argument("--distill", type=float, default=d.distill, help="0 disables distillation from the last exit")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--crop-padding", type=int, default=None)
    p.add_argument("--no-hflip", dest="hflip", action="store_false")
    p.add_argument("--erasing", type=float, default=d.erasing, help="random-erasing probability")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 disables the weight average")
    p.add_argument("--ema-warmup", action="store_true",
                   help="ramp the average's decay up as min(decay, (1+t)/(10+t)): it then does not "
                        "start from the random weights")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--model-config", type=_json_dict, default={}, help='JSON overrides, e.g. \'{"nBlocks": 4}\'')
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--init-from", default=None, help="start from this checkpoint's weights (same model and config)")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from exitserve.models.train import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    checkpoint = train(cfg)
    _print_exit_table(checkpoint.exits, [e.test_accuracy for e in checkpoint.exits])
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="per-exit accuracy of a checkpoint on the official test set")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from exitserve.models.checkpoint import load_checkpoint, model_from_checkpoint
    from exitserve.models.data import load_splits
    from exitserve.models.evaluate import exit_accuracies

    checkpoint = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(checkpoint)
    prep = checkpoint.preprocessing
    dataset = checkpoint.dataset_name
    test = load_splits(dataset, args.data_dir, prep.size).test
    accuracies = exit_accuracies(model, test, prep, progress=not args.json)
    if args.json:
        exits = [
            {"index": e.index, "name": e.name, "accuracy": acc, "flops": e.flops, "params": e.params}
            for e, acc in zip(checkpoint.exits, accuracies)
        ]
        print(json.dumps({"checkpoint": args.checkpoint, "model": checkpoint.model, "dataset": dataset,
                          "test_images": len(test), "exits": exits}, indent=2))
    else:
        _print_exit_table(checkpoint.exits, accuracies)
    return 0


def _print_exit_table(exits: Sequence[ExitRecord], accuracies: Sequence[float | None]) -> None:
    full = exits[-1].flops
    print(f"{'exit':>4}  {'name':<14} {'accuracy':>9} {'MFLOPs':>8} {'of full':>8} {'params':>9}")
    for e, acc in zip(exits, accuracies):
        acc_text = f"{100 * acc:8.2f}%" if acc is not None else "       -"
        print(f"{e.index:>4}  {e.name:<14} {acc_text} {e.flops / 1e6:8.2f} "
              f"{100 * e.flops / full:7.1f}% {e.params / 1e6:8.2f}M")


def _label_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",")]


DATA_HELP = ("fashion-mnist[:PATH], cifar10:PATH, cifar100:PATH or image-folder:PATH "
             "(PATH/train/<class>/*.png, PATH/test/...)")


def _add_metadata_flags(p: argparse.ArgumentParser, what: str, fit: bool = False) -> None:
    g = p.add_argument_group(
        "the model's input", f"{what}; a value also in the model's exitserve_metadata must agree with it, and size, "
        "channels and labels default to the dataset's (--data). The normalisation is the one the model was "
        "trained with: it has no default")
    g.add_argument("--input-size", type=int, default=None, metavar="N", help="side of the square input image")
    g.add_argument("--channels", type=int, default=None, metavar="C")
    g.add_argument("--mean", type=_float_list, default=None,
                   help="per channel, of pixels in [0, 1]: 0.286 or 0.485,0.456,0.406")
    g.add_argument("--std", type=_float_list, default=None, help="per channel, as --mean")
    g.add_argument("--labels", type=_label_list, default=None, help="class names, comma-separated, in output order")
    if not fit:
        return
    g.add_argument("--fit", choices=("crop", "squash", "pad"), default=None,
                   help="how an upload of another shape becomes the model's square: crop (the shorter side to the "
                        "model's size, then the centre; default), squash, or pad (letterbox)")


def _add_export(sub: argparse._SubParsersAction) -> None:
    from exitserve.repository.format import DEFAULT_OPSET  # pydantic, no torch or ONNX Runtime

    p = sub.add_parser("export", help="model -> model repository (per-stage ONNX, manifest, parity gate)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", default=None,
                       help=f"checkpoint of a registered family (default: {DEFAULT_CHECKPOINT})")
    which.add_argument("--model", default=None, metavar="PACKAGE.MODULE:FUNCTION",
                       help="your own factory returning an exitserve.EarlyExitModel (or exitserve.MultiExit); "
                            "imported with the working directory first on sys.path")
    p.add_argument("--weights", default=None, help="with --model: a state dict to load into what it returns")
    p.add_argument("--model-config", type=_json_dict, default=None, help="with --model: its keyword arguments, JSON")
    p.add_argument("--out", required=True, help="model folder to write, e.g. model_repository/msdnet_fmnist")
    p.add_argument("--data", default=None, help=f"parity images' dataset: {DATA_HELP}")
    p.add_argument("--data-dir", default=None, help="dataset folder for the parity images")
    p.add_argument("--parity-images", type=int, default=512)
    p.add_argument("--fp16", action="store_true", help="half-precision graphs (for the CUDA provider)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    _add_metadata_flags(p, "With --model only (a checkpoint carries its own)", fit=True)
    p.set_defaults(handler=_run_export)


METADATA_FLAGS = {"input_size": "--input-size", "channels": "--channels", "mean": "--mean", "std": "--std",
                  "labels": "--labels", "fit": "--fit"}


def _run_export(args: argparse.Namespace) -> int:
    from exitserve.exporter.export import export_factory, export_repository

    common = dict(data=args.data, data_dir=args.data_dir, parity_images=args.parity_images, fp16=args.fp16,
                  opset=args.opset, overwrite=args.overwrite)
    if args.model is not None:
        metadata = {key: getattr(args, key) for key in METADATA_FLAGS}
        manifest, parity = export_factory(args.model, args.out, weights=args.weights, model_config=args.model_config,
                                          **metadata, **common)
    else:
        only_with_model = [flag for key, flag in {**METADATA_FLAGS, "weights": "--weights",
                                                  "model_config": "--model-config"}.items()
                           if getattr(args, key) is not None]
        if only_with_model:
            raise ConfigurationError(f"{', '.join(only_with_model)}: only with --model (a checkpoint carries its "
                                     "own weights and metadata)")
        manifest, parity = export_repository(args.checkpoint or DEFAULT_CHECKPOINT, args.out, **common)
    worst = max(e.max_abs_diff for e in parity.exits)
    print(f"wrote {args.out}: {manifest.num_exits} stages, parity on {parity.images} images "
          f"({manifest.parity['data']}) max |diff| {worst:.2e} (tolerance {parity.tolerance:g})")
    for stage in manifest.stages:
        lat = stage.latency
        print(f"  {stage.file}  exit {stage.exit_name:<14} cost {100 * stage.cost_fraction:5.1f}%  "
              f"batch1 {lat.batch_1_ms:.3f} ms  batch64 {lat.batch_64_ms:.2f} ms ({lat.provider})")
    return 0


def _add_retrofit(sub: argparse._SubParsersAction) -> None:
    from exitserve.models.train_config import RetrofitTrainConfig  # not models.retrofit_train: that imports torch

    d = RetrofitTrainConfig()
    p = sub.add_parser("retrofit", help="train exit heads onto a trained single-exit classifier (frozen)")
    p.add_argument("--backbone", required=True, metavar="PACKAGE.MODULE:FUNCTION",
                   help="your factory returning the trained classifier (an nn.Module giving logits); imported with "
                        "the working directory first on sys.path, here and wherever the checkpoint is exported")
    p.add_argument("--backbone-config", type=_json_dict, default={}, help="the factory's keyword arguments, JSON")
    p.add_argument("--weights", required=True,
                   help="the classifier's state dict (torch.save(model.state_dict(), PATH))")
    p.add_argument("--exits", required=True, metavar="NAME,NAME,...|auto:K",
                   help="submodules to put an exit after, in the order forward runs them (layer1,layer2), or auto:K "
                        "for K exits at even shares of the FLOPs")
    p.add_argument("--out", required=True, help="checkpoint to write; OUT.resume holds the resume state")
    p.add_argument("--data", default=None, help=f"{DATA_HELP} (default: the backbone's metadata's, else fashion-mnist)")
    p.add_argument("--head", default=d.head, help="conv (strided 3x3 conv + BN + ReLU, pooling, linear), "
                                                   "pool (pooling, linear) or mlp (pooling, two linear layers)")
    p.add_argument("--head-width", type=float, default=d.head_width,
                   help="hidden width of a conv or mlp head, times the feature map's channels")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--distill", type=float, default=d.distill,
                   help="share of each head's loss from the backbone's own soft labels (0: labels only)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--crop-padding", type=int, default=None)
    p.add_argument("--no-hflip", dest="hflip", action="store_false")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    _add_metadata_flags(p, "The backbone's input")
    p.set_defaults(handler=_run_retrofit)


def _run_retrofit(args: argparse.Namespace) -> int:
    from exitserve.models.retrofit_train import RetrofitTrainConfig, retrofit

    fields = RetrofitTrainConfig.__dataclass_fields__
    checkpoint = retrofit(RetrofitTrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    _print_exit_table(checkpoint.exits, [e.test_accuracy for e in checkpoint.exits])
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    from exitserve.repository.confidence import DEFAULT_RULE, RULES  # NumPy only

    p = sub.add_parser("calibrate", help="budget-aware exit thresholds from the held-out split")
    p.add_argument("--repository", required=True, help="model folder written by `exitserve export`")
    p.add_argument("--rule", default=DEFAULT_RULE, choices=RULES)
    p.add_argument("--data", default=None,
                   help=f"calibrate on this dataset's held-out split (the images the model will see): {DATA_HELP}; "
                        "default: the dataset the export recorded")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the test-set report")
    p.set_defaults(handler=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from exitserve.exporter.calibrate import calibrate_repository

    calibration, report = calibrate_repository(args.repository, rule=args.rule, data=args.data,
                                               data_dir=args.data_dir, report=args.report)
    held = calibration.heldout
    print(f"wrote {args.repository}/calibration.json: {len(calibration.curve)} budgets, rule {calibration.rule}, "
          f"on {held['images']} held-out images of {held['dataset']} (seeded split, seed {held['seed']})")
    if report:
        print(f"{'budget':>7} {'method':>9} {'held-out acc':>12} {'test acc':>9} {'test cost':>9}")
        for p in report["curve"]:
            print(f"{p['budget']:7.3f} {p['method']:>9} {100 * p['expected_accuracy']:11.2f}% "
                  f"{100 * p['test']['accuracy']:8.2f}% {p['test']['cost']:9.3f}")
        oracle = report["oracle"]
        print(f"oracle: {100 * oracle['accuracy']:.2f}% at cost {oracle['cost']:.3f}; "
              f"plot: {args.repository}/calibration_report.png")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model repository over HTTP (POST /classify)")
    p.add_argument("--model-repository", default=None,
                   help="folder of model folders (default: model_repository/, built from the default model)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--grpc-port", type=int, default=None,
                   help="also serve the Open Inference Protocol over gRPC on this port (default EXITSERVE_GRPC_PORT, "
                        "unset: no gRPC; needs the 'grpc' extra)")
    p.add_argument("--default-budget", type=float, default=None)
    p.add_argument("--workers", type=int, default=None,
                   help="processes on one port (default EXITSERVE_WORKERS, 1); ONNX Runtime threads are split "
                        "among them")
    p.add_argument("--log-level", default="info")
    ray = p.add_argument_group("Ray Serve", "with --ray, the replicas of a Ray Serve deployment across a Ray "
                               "cluster serve instead (needs the 'ray' extra); --host and --port are then "
                               "Serve's HTTP proxy")
    ray.add_argument("--ray", metavar="ADDRESS", default=None,
                     help="the cluster to deploy to, e.g. 10.0.0.5:6379 or auto; serves until SIGTERM or SIGINT, "
                          "which deletes the application")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (with --max-replicas: the fewest kept)")
    ray.add_argument("--max-replicas", type=int, default=None,
                     help="autoscale on ongoing requests between --replicas and this")
    ray.add_argument("--replica-cpus", type=float, default=1.0,
                     help="CPUs Ray reserves per replica; its ONNX Runtime threads follow")
    ray.add_argument("--proxy-location", choices=["EveryNode", "HeadOnly"], default="EveryNode",
                     help="where Serve runs its HTTP proxy")
    ray.add_argument("--replica-metrics-port", type=int, default=0,
                     help="each replica's Prometheus listener (0: any free port; listed at /ray/metrics-targets)")
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from exitserve.server.http.serving import serve
    from exitserve.server.settings import DEFAULT_MODEL, Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "grpc_port": args.grpc_port,
                                   "default_budget": args.default_budget, "model_repository": args.model_repository,
                                   "workers": args.workers}.items()
                 if v is not None}
    try:  # options and EXITSERVE_* variables
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(str(exc)) from None
    if settings.grpc_port is not None:
        if args.ray is not None:
            raise ConfigurationError("--ray serves HTTP only: leave out --grpc-port (and EXITSERVE_GRPC_PORT)")
        from exitserve.server.grpc import require_grpc  # imports nothing of grpc itself

        require_grpc()  # before exporting or loading anything: one line naming the extra
    if args.model_repository is None:
        _ensure_default_repository(settings.model_repository / DEFAULT_MODEL)
    if args.ray is not None:
        from exitserve.server.deployments.ray_serve import RayOptions, run  # imports ray: only when asked for

        try:
            options = RayOptions(replicas=args.replicas, max_replicas=args.max_replicas,
                                 replica_cpus=args.replica_cpus, proxy_location=args.proxy_location,
                                 metrics_port=args.replica_metrics_port)
        except ValidationError as exc:
            raise ConfigurationError(str(exc)) from None
        return run(args.ray, settings, options, args.log_level)
    return serve(settings, args.log_level)


def _ensure_default_repository(folder) -> None:
    """First start without a repository: export and calibrate the committed default model."""
    if (folder / "manifest.json").is_file() and (folder / "calibration.json").is_file():
        return
    print(f"{folder} is missing: exporting and calibrating {DEFAULT_CHECKPOINT} (once, about a minute)",
          file=sys.stderr)
    from exitserve.exporter.calibrate import calibrate_repository
    from exitserve.exporter.export import export_repository

    export_repository(DEFAULT_CHECKPOINT, folder, overwrite=True)
    calibrate_repository(folder, report=True)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered model builders and where each comes from "
                                      "(built-in, or the plug-in distribution)")
    p.set_defaults(handler=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from exitserve.models.registry import model_origins  # the registry itself: needs PyTorch

    origins = model_origins()
    width = max(map(len, origins))
    print("\n".join(f"{name:<{width}}  {origin}" for name, origin in origins.items()))
    return 0


EXTRA_OF = {"torch": "train", "onnx": "train", "matplotlib": "train", "ray": "ray", "grpc": "grpc"}


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train, _add_evaluate, _add_retrofit, _add_export, _add_calibrate, _add_serve, _add_models,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root not in EXTRA_OF:
            raise
        print(f"exitserve {args.command}: needs the '{EXTRA_OF[root]}' extra ({root} is not installed): "
              f"pip install 'exitserve[{EXTRA_OF[root]}]'", file=sys.stderr)
        return 2
    except ExitserveError as exc:  # a user's mistake, said in its message; anything else is a bug
        print(f"exitserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
