"""Command line: ``python -m adaptive_moments.experiments [options]``.

Only the parser and the entry point live here: the run itself is
:mod:`.driver`, merging is :mod:`.merge`, the checks are :mod:`.checks`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import sys
from typing import Any, NoReturn

from adaptive_moments.experiments.config import DEFAULT_LR_GRID, PRESETS, ExperimentConfig
from adaptive_moments.experiments.data import DataMissingError

# Measured on the 2-core CPU (load noted in BUILD_NOTES, "Tuned main job").
_DEFAULT_TIME = (
    "about 3 min on a quiet 2-core CPU (185 s measured; the untuned default it replaced: 276 s)"
)

_EPILOG = """\
optimizers (NAME or NAME:key=value,...; lr=... sets that optimizer's base rate):
{optimizers}

learning rates: by default every optimizer is tuned. The first --tune-seeds
seeds train at each rate of --lr-grid (multiples of the optimizer's base
rate: --lr, or its spec's lr=...; absolute rates with --absolute-lr-grid);
the rate with the best mean validation metric is chosen and the other seeds
train at it. The test split is evaluated once, at the end. --lr-grid 1
turns tuning off.

presets:
{presets}

examples:
  python -m adaptive_moments.experiments                       # the default, {time}
  python -m adaptive_moments.experiments --lr-grid 0.1,0.3,1,3,10 --num-seeds 6
  python -m adaptive_moments.experiments --task regression_mlp --model paper --seeds 0 1 2
  python -m adaptive_moments.experiments --optimizers adam \\
      caadam:strategy=additive,structure=reference exadam_v1 --epochs 3
"""

# Import name -> what it is for; all come with the "experiments" extra.
_EXTRAS = {
    "flax": "models",
    "matplotlib": "figures",
    "tqdm": "progress bars",
    "scipy": "statistics",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other bad-input message of this command.
        self.exit(2, f"error: {message} (see --help)\n")


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.3,1,3, got {text!r}") from None
    if not rates:
        raise argparse.ArgumentTypeError("expected at least one rate")
    return rates


def build_parser() -> argparse.ArgumentParser:
    from adaptive_moments.experiments.optimizers import describe_optimizers
    from adaptive_moments.experiments.tasks import TASKS

    presets = "\n".join(
        f"  {name:<16} {p['task']}, {len(p['seeds'])} seeds, {len(p['optimizers'])} optimizers"
        + (", learning rate not tuned" if p.get("lr_grid") == [1.0] else ", tuned")
        for name, p in PRESETS.items()
    )
    parser = _Parser(
        prog="python -m adaptive_moments.experiments",
        description=(
            "Compare CaAdam, SET-Adam, EXAdam and baselines on real offline data, each "
            "optimizer at its own learning rate chosen on validation. Prints a table (test "
            "metric over seeds; per-seed paired differences to Adam with 95 % CI, paired "
            "t-test, Holm, d_z) and writes two PNGs and a JSON report. Without arguments: the "
            f"'quick' preset ({_DEFAULT_TIME})."
        ),
        epilog=_EPILOG.format(
            optimizers=describe_optimizers(), presets=presets, time=_DEFAULT_TIME
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks = ", ".join(f"{n} ({t.description})" for n, t in TASKS.items())
    a = parser.add_argument
    a("--preset", choices=sorted(PRESETS), help="start from a named configuration")
    a("--task", choices=sorted(TASKS), help=f"the task: {tasks}")
    a("--optimizers", nargs="+", metavar="SPEC", help="optimizer specs (see below)")
    a("--seeds", nargs="+", type=int, metavar="S", help="seeds")
    a("--num-seeds", type=int, metavar="N", help="shorthand for --seeds 0 .. N-1")
    a("--epochs", type=int, help="epochs (max epochs with early stopping)")
    a("--lr", type=float, help="base learning rate of every optimizer (task default if unset)")
    a(
        "--lr-grid",
        type=_rates,
        metavar="R1,R2,...",
        help="rates to try per optimizer, as multiples of its base rate "
        f"(default {','.join(f'{x:.3g}' for x in DEFAULT_LR_GRID)}; 1 = no tuning)",
    )
    a(
        "--absolute-lr-grid",
        dest="lr_grid_absolute",
        action="store_true",
        default=None,
        help="--lr-grid values are learning rates, the same for every optimizer",
    )
    a("--tune-seeds", type=int, metavar="N", help="seeds the search runs on (the first N; 1)")
    a("--batch-size", type=int)
    a(
        "--train-subset",
        type=int,
        metavar="N",
        help="training examples (chars for the GPT); 0 = all",
    )
    a("--test-subset", type=int, metavar="N", help="test examples (windows for the GPT); 0 = all")
    a("--val-fraction", type=float, help="last fraction of the training subset kept for validation")
    a(
        "--model",
        action="append",
        metavar="M",
        help="model string, repeatable. fashion_mnist_cnn: c1=16,c2=32,dense=64; "
        "fashion_mnist_resnet20: n=3,width=16; shakespeare_gpt: "
        "layers=2,d=64,heads=4,block=64,dropout=0.0; regression_mlp: hidden sizes "
        "such as 64,32, or 'paper' for the CaAdam paper's six",
    )
    a(
        "--lr-from",
        metavar="JSON",
        help="train every optimizer at the rate it chose in this earlier report of the same "
        "comparison (no search): a later sitting whose seeds --merge pools with that one",
    )
    a(
        "--extend-search",
        metavar="JSON",
        help="train only the --lr-grid rates this earlier search (same options and seeds, "
        "all searched) lacks, choose over all of them, and report the whole search: a "
        "choice at the grid's edge searched further without training its rates again",
    )
    a("--dataset", help="regression_mlp: diabetes (default) or diamonds (20,640 rows)")
    a(
        "--image-size",
        type=int,
        choices=(28, 56),
        help="Fashion-MNIST size (56: scipy zoom, order 3)",
    )
    a("--channels", type=int, choices=(1, 3), help="Fashion-MNIST channels (3: replicated)")
    a("--steps-per-epoch", type=int, help="char-GPT: optimizer steps between evaluations")
    a("--eval-windows", type=int, help="char-GPT: validation windows per evaluation")
    a("--text-chars", type=int, help="char-GPT: characters of Shakespeare to use (0 = all 5.06M)")
    a("--early-stopping", type=int, metavar="PATIENCE", help="Keras EarlyStopping on val loss")
    a("--early-stopping-start", type=int, metavar="EPOCH")
    a("--reduce-lr", type=int, metavar="PATIENCE", help="Keras ReduceLROnPlateau on val loss")
    a(
        "--restore-best",
        action=argparse.BooleanOptionalAction,
        help="test with the best-validation weights (default: on with early stopping)",
    )
    a("--target-loss", type=float, help="train loss for 'steps to target' (default: Adam's final)")
    a(
        "--batching",
        choices=("auto", "vmap", "unroll", "sequential"),
        help="how one optimizer's trials share a compiled program (default auto)",
    )
    a("--output-dir", help="where the PNGs, JSON and Markdown table go (default results/)")
    a("--name", help="file stem of the outputs (default: preset or task plus a time stamp)")
    a(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bars (one line per run instead)",
    )
    a("--no-plot", dest="plot", action="store_false", default=None, help="skip the PNGs")
    a(
        "--no-step-losses",
        dest="step_losses",
        action="store_false",
        default=None,
        help="keep per-epoch curves only in the JSON (no per-step train losses)",
    )
    a(
        "--generalisation",
        action="store_true",
        default=None,
        help="also record the test metric per epoch and the tested weights' train-split "
        "metric: the generalisation gap and the test metric at a matched train loss",
    )
    a(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="instead of training: pool the seeds of earlier JSON reports of the same "
        "comparison (same options and chosen rates) into one table, figures and JSON "
        "(with --name, --output-dir, --no-plot)",
    )
    return parser


def config_from_args(argv: list[str] | None = None) -> ExperimentConfig:
    """Parses the command line into a config (preset, then explicit options)."""
    return _config(build_parser().parse_args(argv))


def _config(args: argparse.Namespace) -> ExperimentConfig:
    if args.preset:
        base: dict[str, Any] = dict(copy.deepcopy(PRESETS[args.preset]), preset=args.preset)
    elif args.task:
        base = {"task": args.task}
    else:
        base = dict(copy.deepcopy(PRESETS["quick"]), preset="quick")
    if args.task and args.preset and args.task != base["task"]:
        raise ValueError(f"--preset {args.preset} is for task {base['task']}, not {args.task}.")
    cfg = ExperimentConfig(**base)
    overrides = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("preset", "num_seeds") and hasattr(cfg, k)
    }
    if args.num_seeds is not None:
        if args.seeds is not None:
            raise ValueError("give --seeds or --num-seeds, not both.")
        if args.num_seeds < 1:
            raise ValueError(f"--num-seeds must be at least 1, got {args.num_seeds}.")
        overrides["seeds"] = list(range(args.num_seeds))
    return dataclasses.replace(cfg, **overrides)


def missing_extra(plot: bool = True, progress: bool = True) -> str | None:
    """The message for a missing dependency of the ``experiments`` extra, or None."""
    needed = [m for m in _EXTRAS if (m != "matplotlib" or plot) and (m != "tqdm" or progress)]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    what = ", ".join(f"{m} ({_EXTRAS[m]})" for m in missing)
    return (
        f"missing {what}: install the experiments extra, "
        f'pip install "adaptive_moments[experiments]" (or make run).'
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input or missing data)."""
    argv = sys.argv[1:] if argv is None else argv
    wants_plot = "--no-plot" not in argv
    wants_progress = "--no-progress" not in argv
    msg = missing_extra(wants_plot, wants_progress)
    if msg:
        print(f"error: {msg}", file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a parse error (already printed)
        return int(e.code or 0)
    try:
        cfg = _config(args)
        from adaptive_moments.experiments import report

        report.COMMAND_ARGS = list(argv)  # recorded in the JSON report
        if args.merge:
            from adaptive_moments.experiments.merge import merge_reports

            result = merge_reports(args.merge, cfg.name, cfg.output_dir, cfg.plot)
        else:
            from adaptive_moments.experiments.driver import run_experiment

            result = run_experiment(cfg)
    except (DataMissingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for kind, path in result["paths"].items():
        print(f"{kind}: {path}")
    print(f"wall time: {result['wall_time_s']:.1f} s")
    return 0


__all__ = ["build_parser", "config_from_args", "main", "missing_extra"]
