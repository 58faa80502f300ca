"""Command line: ``python -m adaptive_moments.experiments [options]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from adaptive_moments.experiments import config as config_lib
from adaptive_moments.experiments.config import PRESETS, ExperimentConfig
from adaptive_moments.experiments.data import DataMissingError

_EPILOG = """\
optimizers (NAME or NAME:key=value,...; lr=... overrides --lr for that one):
{optimizers}

presets:
{presets}

examples:
  python -m adaptive_moments.experiments                       # the ~5 min default
  python -m adaptive_moments.experiments --task regression_mlp --model paper --seeds 0 1 2
  python -m adaptive_moments.experiments --optimizers adam \\
      caadam:strategy=additive,structure=reference exadam_v1 --epochs 3
"""


def build_parser() -> argparse.ArgumentParser:
    from adaptive_moments.experiments.optimizers import describe_optimizers
    from adaptive_moments.experiments.tasks import TASKS

    presets = "\n".join(
        f"  {name:<16} {p['task']}, {len(p['seeds'])} seeds, {len(p['optimizers'])} optimizers"
        for name, p in PRESETS.items()
    )
    parser = argparse.ArgumentParser(
        prog="python -m adaptive_moments.experiments",
        description=(
            "Compare CaAdam, SET-Adam, EXAdam and baselines on real offline data. "
            "Prints a table (mean ± std over seeds, Welch t-test vs Adam) and writes a PNG "
            "and a JSON report. Without arguments: the 'quick' preset (about 5 minutes on "
            "a 2-core CPU)."
        ),
        epilog=_EPILOG.format(optimizers=describe_optimizers(), presets=presets),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks = ", ".join(f"{n} ({t.description})" for n, t in TASKS.items())
    a = parser.add_argument
    a("--preset", choices=sorted(PRESETS), help="start from a named configuration")
    a("--task", choices=sorted(TASKS), help=f"the task: {tasks}")
    a("--optimizers", nargs="+", metavar="SPEC", help="optimizer specs (see below)")
    a("--seeds", nargs="+", type=int, metavar="S", help="seeds (default 0 1 2)")
    a("--num-seeds", type=int, metavar="N", help="shorthand for --seeds 0 .. N-1")
    a("--epochs", type=int, help="epochs (max epochs with early stopping)")
    a("--lr", type=float, help="learning rate for every optimizer")
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
    a("--output-dir", help="where the PNG, JSON and Markdown table go (default results/)")
    a("--name", help="file stem of the outputs (default: preset or task plus a time stamp)")
    a(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bars (one line per run instead)",
    )
    a("--no-plot", dest="plot", action="store_false", default=None, help="skip the PNG")
    a(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="instead of training: pool the seeds of earlier JSON reports of the same "
        "comparison into one table, plot and JSON (with --name, --output-dir, --no-plot)",
    )
    return parser


def config_from_args(argv: list[str] | None = None) -> ExperimentConfig:
    """Parses the command line into a config (preset, then explicit options)."""
    return _config(build_parser().parse_args(argv))


def _config(args: argparse.Namespace) -> ExperimentConfig:
    if args.preset:
        base: dict[str, Any] = dict(PRESETS[args.preset], preset=args.preset)
    elif args.task:
        base = {"task": args.task}
    else:
        base = dict(PRESETS["quick"], preset="quick")
    cfg = ExperimentConfig(**base)
    overrides = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("preset", "num_seeds") and hasattr(cfg, k)
    }
    if args.num_seeds is not None:
        overrides["seeds"] = list(range(args.num_seeds))
    cfg = dataclasses.replace(cfg, **overrides)
    return cfg


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """Runs a whole comparison and writes its outputs.

    Returns:
      The report (also written as JSON), with ``paths`` to the files.

    Raises:
      DataMissingError: a data set is not installed.
    """
    from adaptive_moments.experiments import report
    from adaptive_moments.experiments.optimizers import parse_optimizer
    from adaptive_moments.experiments.tasks import TASKS
    from adaptive_moments.experiments.train import run_group

    t_start = time.perf_counter()
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; known: {', '.join(TASKS)}.")
    task = TASKS[cfg.task]()
    cfg = cfg.resolved(task.defaults)
    if not cfg.seeds:
        raise ValueError("at least one seed is needed.")
    specs = [parse_optimizer(s) for s in cfg.optimizers]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate optimizer specs: {labels}.")
    data = task.load(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.name or f"{cfg.preset or cfg.task}_{stamp}"
    print(
        f"{task.name}: {task.description}\n"
        f"  data: {data.info}\n"
        f"  optimizers: {', '.join(labels)}\n"
        f"  seeds: {cfg.seeds}; epochs {cfg.epochs}; lr {cfg.lr}; batch {cfg.batch_size}",
        flush=True,
    )
    groups = []
    for model_name in task.model_names(cfg):
        groups.append(run_group(task, data, cfg, model_name, specs))
    result = {
        "config": dataclasses.asdict(cfg),
        "task": {
            "name": task.name,
            "description": task.description,
            "metric": task.metric,
            "higher_is_better": task.higher_is_better,
        },
        "data": data.info,
        "optimizers": {s.label: {"name": s.name, "kwargs": s.kwargs, "lr": s.lr} for s in specs},
        "groups": groups,
        "versions": report.versions(),
    }
    return _summarize_and_write(result, name, time.perf_counter() - t_start)


def _summarize_and_write(result: dict[str, Any], name: str, wall: float) -> dict[str, Any]:
    """Adds each group's summary and table, prints them, writes MD/PNG/JSON."""
    from adaptive_moments.experiments import report

    cfg, task = result["config"], result["task"]
    seeds = cfg["seeds"]
    for g in result["groups"]:
        g["summary"] = report.summarize(g, task["higher_is_better"], cfg["target_loss"])
        g["table"] = report.format_table(g["summary"], task["metric"], len(seeds))
        print(f"\n{task['name']}, model {g['model']} ({g['num_params']:,} parameters)")
        print(g["table"], flush=True)
    out_dir = Path(cfg["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out_dir / f"{name}.json"), "table": str(out_dir / f"{name}.md")}
    if cfg["plot"]:
        paths["png"] = str(out_dir / f"{name}.png")
        title = f"{task['name']} ({name}): mean over seeds {seeds}"
        report.plot(result["groups"], task["metric"], title, Path(paths["png"]))
    with open(paths["table"], "w") as f:
        f.write(f"# {task['name']} ({name})\n\nseeds {seeds}, wall time {wall:.0f} s\n")
        for g in result["groups"]:
            f.write(f"\n## model {g['model']} ({g['num_params']:,} parameters)\n\n{g['table']}\n")
    result = dict(result, wall_time_s=wall, paths=paths)
    report.write_json(result, Path(paths["json"]))
    return result


# Config fields that may differ between reports that are merged.
_MERGE_FREE = ("seeds", "name", "preset", "output_dir", "progress", "plot")


def merge_reports(
    paths: list[str], name: str | None = None, output_dir: str | None = None, plot: bool = True
) -> dict[str, Any]:
    """Combines JSON reports of one comparison run with different seeds.

    The reports must agree on the task, the data, the optimizers and every
    option but the seeds (and the output names); their runs are pooled per
    optimizer and model, the statistics, table and plot are made anew, and
    the wall time is the sum. Lets a small machine collect seeds over several
    sessions.

    Raises:
      ValueError: fewer than two reports, a seed in two of them, or a
        difference in anything but the seeds.
    """
    import json

    if len(paths) < 2:
        raise ValueError("--merge needs at least two JSON reports.")
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    first = reports[0]

    def fixed(r: dict[str, Any]) -> dict[str, Any]:
        cfg = {k: v for k, v in r["config"].items() if k not in _MERGE_FREE}
        models = [(g["model"], g["num_params"], g["param_order"]) for g in r["groups"]]
        return {
            "config": cfg,
            "task": r["task"],
            "data": r["data"],
            "optimizers": r["optimizers"],
            "models": models,
        }

    ref = fixed(first)
    seen: set[int] = set()
    for path, r in zip(paths, reports, strict=True):
        other = fixed(r)
        diff = sorted(k for k in ref if other[k] != ref[k])
        if diff:
            keys = diff
            if "config" in diff:
                keys = sorted(
                    k for k in ref["config"] if other["config"].get(k) != ref["config"][k]
                )
            raise ValueError(f"{path} differs from {paths[0]} in {', '.join(keys)}.")
        dup = seen.intersection(r["config"]["seeds"])
        if dup:
            raise ValueError(f"seed(s) {sorted(dup)} appear in more than one report.")
        seen.update(r["config"]["seeds"])

    seeds = sorted(seen)
    groups = []
    for gi, g in enumerate(first["groups"]):
        runs = {
            label: sorted(
                (run for r in reports for run in r["groups"][gi]["runs"][label]),
                key=lambda run: run["seed"],
            )
            for label in g["runs"]
        }
        groups.append({k: g[k] for k in ("model", "num_params", "param_order", "layer_table")})
        groups[-1]["runs"] = runs
    cfg = dict(first["config"], seeds=seeds, plot=plot)
    if output_dir is not None:
        cfg["output_dir"] = output_dir
    name = name or f"{first['config'].get('name') or first['task']['name']}_merged"
    cfg["name"] = name
    result = {
        "config": cfg,
        "task": first["task"],
        "data": first["data"],
        "optimizers": first["optimizers"],
        "groups": groups,
        "versions": first["versions"],
        "merged_from": list(paths),
    }
    return _summarize_and_write(result, name, sum(r["wall_time_s"] for r in reports))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 when data is missing)."""
    args = build_parser().parse_args(argv)
    cfg = _config(args)
    try:
        if args.merge:
            result = merge_reports(args.merge, cfg.name, cfg.output_dir, cfg.plot)
        else:
            result = run_experiment(cfg)
    except DataMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for kind, path in result["paths"].items():
        print(f"{kind}: {path}")
    print(f"wall time: {result['wall_time_s']:.1f} s")
    return 0


__all__ = [
    "build_parser",
    "config_from_args",
    "config_lib",
    "main",
    "merge_reports",
    "run_experiment",
]
