"""One short run that collects the figures a GPU session should bring back.

Sections (each timed; a failing section is recorded and the others still run):

* ``device``: the devices, the peak memory bandwidth from a table of known
  parts and the bandwidth a copy kernel reaches (``y = x + 1``, read + write);
* ``step``: optimizer-only step-time ratios to ``optax.adam`` on the 30M and
  125M GPT-like trees (``step_time.py``'s interleaved method), and per
  optimizer the bytes a step moves (XLA's ``bytes accessed`` of the compiled
  step, and the floor of an Adam-like update: read params, grads, m, v and
  write params, m, v: 7 x 4 bytes per parameter), the bandwidth that implies
  and its fraction of the measured copy bandwidth (the roofline);
* ``compile`` (run last): ``step_time.py``'s compile cases, smaller than on
  CPU and for five candidates: optimizer step on 250 leaves and the whole train
  step of an 8-block unscanned transformer;
* ``sharding``: every optimizer's jitted step with the parameters sharded over
  all devices of the default backend, against the same step on one device;
  and ``tests/test_sharding.py`` on 8 forced CPU devices (``JAX_PLATFORMS=cpu``,
  as CI runs it);
* ``experiments``: one vmapped training comparison from the main job
  (``python -m adaptive_moments.experiments --batching vmap``, small options).

Everything goes to ``summary.{json,md}`` in ``--out``. With
``--small`` every section runs at toy sizes (CPU, under a minute):
``tests/test_gpu_check.py`` runs it so this script cannot rot. On a GPU run
``benchmarks/gpu_check.sh [OUT]``: on an H200 (2026-12-04) the sections
before ``compile`` took 4.6 minutes. ``--ab FILE`` adds another version's
optimizers to the step and sharding sections (as ``step_time.py --ab``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMALL_CPU_DEVICES = 8  # --small on CPU: virtual devices, so the sharding check shards
# --small: adam, its control and the two optimizers with the most per-layer code
# (every candidate goes through the same code; the compiles are what cost time).
SMALL_CANDIDATES = ("adam", "caadam_depth", "set_adam", "adam_control")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "results/gpu_check")
    parser.add_argument(
        "--small",
        action="store_true",
        default=os.environ.get("GPU_CHECK_SMALL") == "1",
        help="toy sizes everywhere (CPU smoke test; also GPU_CHECK_SMALL=1)",
    )
    parser.add_argument(
        "--sections",
        default="device,step,compile,sharding,experiments",
        help="comma list of sections to run",
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per tree")
    parser.add_argument(
        "--ab",
        default=None,
        help="a copy of a library module (as step_time.py --ab): its optimizers join the "
        "step and sharding sections as <name>_ab, interleaved with the current ones",
    )
    return parser.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])

import jax  # noqa: E402

if ARGS.small and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    # Before the backend starts: several CPU devices, so the sharding check
    # really shards (the small mode runs on CPU).
    jax.config.update("jax_num_cpu_devices", SMALL_CPU_DEVICES)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adaptive_moments as am  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time as st  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Peak DRAM bandwidth (bytes/s) of parts we may be lent, from the vendors'
# data sheets; matched as substrings of jax's device_kind.
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 80GB HBM3": 3.35e12,  # SXM
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100-SXM4-40GB": 1.555e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,
    "L40S": 0.864e12,
    "L4": 0.3e12,
    "V100": 0.9e12,
}


def _timed(fn: Callable[[], Any], n: int) -> float:
    """Median seconds of ``n`` calls, each ended by ``block_until_ready``."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------
# sections


def device_section(small: bool) -> dict[str, Any]:
    dev = jax.devices()[0]
    kind = dev.device_kind
    peak = next((bw for k, bw in PEAK_BANDWIDTH.items() if k in kind), None)
    n = (4 << 20) if small else (1 << 28)  # float32 elements: 16 MiB or 1 GiB
    x = jnp.zeros((n,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)
    jax.block_until_ready(copy(x))  # compile
    seconds = _timed(lambda: copy(x), 5 if small else 20)
    copy_bw = 2 * 4 * n / seconds  # read x, write y
    return {
        "backend": jax.default_backend(),
        "device_kind": kind,
        "num_devices": jax.device_count(),
        "devices": [str(d) for d in jax.devices()],
        "peak_bandwidth_spec": peak,
        "copy_bytes": 8 * n,
        "copy_bandwidth": copy_bw,
        "copy_fraction_of_spec": None if peak is None else copy_bw / peak,
    }


def _names(small: bool) -> list[str]:
    if not small:
        return list(st.CANDIDATES)
    return [*SMALL_CANDIDATES, *(n for n in st.CANDIDATES if n.endswith("_ab"))]


def step_section(small: bool, rounds: int | None, copy_bw: float | None) -> dict[str, Any]:
    names = _names(small)
    if small:
        trees = {"tiny-gpt": (st.gpt_shapes(257, 64, 32, 2), False)}
        rounds, steps = rounds or 2, 2
    else:
        trees = {
            "opt30m": (st.gpt_shapes(50257, 1024, 384, 6), False),
            "opt125m": (st.gpt_shapes(50257, 1024, 768, 12), True),
        }
        rounds, steps = rounds or 10, 5
    out = {}
    for case, (shapes, fresh) in trees.items():
        n = st.num_params(shapes)
        template = st.materialize(shapes, 0, 0.02)
        grads = st.materialize(shapes, 1, 1e-3)
        times = st.interleaved(names, st._opt_step, template, grads, rounds, steps, fresh=fresh)
        rows = st.summarize(times)
        params = st.abstract_tree(shapes)
        floor = 7 * 4 * n  # read p, g, m, v; write p, m, v (float32)
        for name, r in rows.items():
            _, lowered = st._lower_opt_step(name, params)
            # The compiled (fused) program's traffic; --small takes the unfused
            # estimate of the lowered program instead, to skip a compile.
            cost = (lowered if small else lowered.compile()).cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per program
            xla_bytes = float(cost.get("bytes accessed", float("nan"))) if cost else float("nan")
            r["bytes_xla_source"] = "lowered (unfused)" if small else "compiled"
            seconds = r["median_ms"] / 1e3
            r["bytes_xla"] = xla_bytes
            r["bytes_floor"] = floor
            r["bandwidth_xla"] = xla_bytes / seconds
            r["bandwidth_floor"] = floor / seconds
            if copy_bw:
                r["roofline_fraction_xla"] = xla_bytes / seconds / copy_bw
                r["roofline_fraction_floor"] = floor / seconds / copy_bw
        out[case] = {"params": n, "leaves": len(jax.tree.leaves(params)), "rows": rows}
        del template, grads
    return out


# The compile section on a GPU: fewer candidates and sizes than the CPU
# benchmark's (1,000 leaves, 24 blocks). On an H200 (2026-12-04) all eight
# candidates at the CPU sizes had not finished after 200 s (likely because
# XLA:GPU compiles every kernel through ptxas), so the section would eat the
# device budget.
GPU_COMPILE_CANDIDATES = ("adam", "caadam_depth", "set_adam", "exadam", "adam_control")
GPU_COMPILE_LEAVES, GPU_COMPILE_BLOCKS = 250, 8


def compile_section(small: bool) -> dict[str, Any]:
    names = _names(small) if small else list(GPU_COMPILE_CANDIDATES)
    leaves, blocks, reps = (40, 1, 1) if small else (GPU_COMPILE_LEAVES, GPU_COMPILE_BLOCKS, 1)
    out = {}
    rows = st.compile_case(names, st.small_leaves_shapes(leaves), reps, st.COMPILE_TARGET)
    out[f"compile-{leaves}"] = {"leaves": leaves, "rows": rows}
    shapes, loss_fn, batch = st.deep_model(blocks, 32)
    rows = st.compile_case(names, shapes, reps, st.DEEP_COMPILE_TARGET, loss_fn, batch)
    out["compile-deep"] = {"blocks": blocks, "rows": rows}
    return out


def sharding_section(small: bool) -> dict[str, Any]:
    """Each optimizer: sharded step over all devices == the one-device step."""
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("fsdp",), devices=devices)
    n = len(devices)
    d = 8 * n if small else 256 * n
    shapes = st.gpt_shapes(64 * n, 16 * n, d, 2)
    params = st.materialize(shapes, 0, 0.02)
    grads = st.materialize(shapes, 1, 1e-3)

    def spec(x: jax.Array) -> P:
        # Shard the leading axis where it divides (FSDP-style); else replicate.
        return P("fsdp") if x.ndim and x.shape[0] % n == 0 else P()

    def place(tree: Any, sharded: bool) -> Any:
        if not sharded:
            return jax.device_put(tree, devices[0])
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), tree)

    out = {"devices": n, "mesh": dict(mesh.shape), "rows": {}}
    for name in _names(small):
        opt = st.CANDIDATES[name]()
        results = []
        # Not donated: on one device device_put may hand back `params` itself.
        step = jax.jit(lambda p, s, g, opt=opt: _apply(opt, p, s, g))
        for sharded in (False, True):
            p, g = place(params, sharded), place(grads, sharded)
            state = opt.init(p)
            for _ in range(3):
                p, state = step(p, state, g)
            results.append(jax.device_get(p))
        diffs = jax.tree.leaves(
            jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), results[0], results[1])
        )
        out["rows"][name] = {"max_abs_diff": max(diffs), "ok": bool(max(diffs) <= 1e-6)}
    return out


def _apply(opt: optax.GradientTransformation, params: Any, state: Any, grads: Any) -> tuple:
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def sharding_tests_section(small: bool) -> dict[str, Any]:
    """``pytest tests/test_sharding.py`` on 8 forced CPU devices (CI's setting)."""
    if small:
        return {"skipped": "small mode (the test suite runs it on CPU already)"}
    return _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "tests/test_sharding.py"],
        env={"JAX_PLATFORMS": "cpu"},
        timeout=300,
    )


def experiments_section(small: bool, out_dir: Path) -> dict[str, Any]:
    common = ["--batching", "vmap", "--no-plot", "--no-progress", "--lr-grid", "1"]
    exp_dir = out_dir / "experiments"
    if small:
        cmd = [
            "--task", "regression_mlp", "--optimizers", "adam", "caadam", "--seeds", "0", "1",
            "--epochs", "1",
        ]
    else:
        # The main job (Fashion-MNIST CNN, every default optimizer), 3 seeds vmapped.
        cmd = ["--preset", "quick", "--epochs", "2"]
    argv = [sys.executable, "-m", "adaptive_moments.experiments", *cmd, *common,
            "--output-dir", str(exp_dir), "--name", "gpu_check"]
    result = _run(argv, timeout=150 if small else 240)
    result["reports"] = sorted(str(p.relative_to(out_dir)) for p in exp_dir.glob("*.json"))
    return result


def _run(argv: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            argv, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
            timeout=timeout,
        )
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e.stdout or "")[-4000:]
    return {"command": " ".join(argv), "rc": rc, "ok": rc == 0, "seconds": time.perf_counter() - t0,
            "output_tail": tail}


# ---------------------------------------------------------------------------
# summary


def _markdown(summary: dict[str, Any]) -> str:
    lines = ["# GPU check", ""]
    meta = summary["meta"]
    lines.append(f"{meta['device_kind']} x{meta['num_devices']} ({meta['backend']}), "
                 f"jax {meta['jax']}, small={meta['small']}, {meta['date']}")
    lines.append("")
    for name, sec in summary["sections"].items():
        status = "ok" if sec["ok"] else f"FAILED: {sec.get('error', '')}"
        lines.append(f"## {name} ({sec['seconds']:.1f} s, {status})")
        lines.append("")
        res = sec.get("result") or {}
        if name == "device" and res:
            spec = res["peak_bandwidth_spec"]
            lines.append(f"copy kernel {res['copy_bandwidth'] / 1e9:.1f} GB/s; data sheet "
                         f"{'-' if spec is None else f'{spec / 1e9:.0f} GB/s'}")
        elif name == "step":
            for case, c in res.items():
                lines += [f"{case}: {c['params'] / 1e6:.2f}M params, {c['leaves']} leaves", "",
                          "| optimizer | median ms | ratio | bytes/step (XLA) | "
                          "roofline (XLA bytes) | roofline (7x4 B floor) |",
                          "|---|---|---|---|---|---|"]
                for opt, r in c["rows"].items():
                    lines.append(
                        f"| {opt} | {r['median_ms']:.3f} | {r['ratio']:.3f} | "
                        f"{r['bytes_xla'] / 1e6:.1f} MB | "
                        f"{r.get('roofline_fraction_xla', float('nan')):.2f} | "
                        f"{r.get('roofline_fraction_floor', float('nan')):.2f} |")
                lines.append("")
        elif name == "compile":
            for case, c in res.items():
                lines += [f"{case}", "",
                          "| optimizer | total s | ratio | HLO ops/leaf | fused bodies |",
                          "|---|---|---|---|---|"]
                for opt, r in c["rows"].items():
                    lines.append(f"| {opt} | {r['total_s']:.2f} | {r['ratio']:.3f} | "
                                 f"{r['hlo_ops_per_leaf']:.1f} | {r['distinct_fused_bodies']} |")
                lines.append("")
        elif name == "sharding" and res:
            lines.append(f"mesh {res['mesh']}: " + ", ".join(
                f"{o} {'ok' if r['ok'] else 'DIFF'} ({r['max_abs_diff']:.1e})"
                for o, r in res["rows"].items()))
        elif res and "rc" in res:
            lines.append(f"`{res['command']}`: rc {res['rc']} in {res['seconds']:.0f} s")
            if res.get("reports"):
                lines.append(f"reports: {', '.join(res['reports'])}")
            lines += ["", "```", res["output_tail"][-1500:], "```"]
        elif res:
            lines.append(json.dumps(res))
        lines.append("")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = args.sections.split(",")
    sections: dict[str, dict[str, Any]] = {}

    def run(name: str, fn: Callable[[], Any]) -> Any:
        if name.split("-")[0] not in wanted:
            return None
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            result = fn()
            ok = not (isinstance(result, dict) and result.get("ok") is False)
            sections[name] = {"ok": ok, "seconds": time.perf_counter() - t0, "result": result}
        except Exception as e:  # noqa: BLE001  (record and go on: one summary for all)
            sections[name] = {"ok": False, "seconds": time.perf_counter() - t0,
                              "error": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc()}
            result = None
        print(f"[gpu_check] {name}: {'ok' if sections[name]['ok'] else 'FAILED'} "
              f"({sections[name]['seconds']:.1f} s)", flush=True)
        return result

    def write() -> None:
        # After every section: a run cut short by the time limit keeps what it has.
        summary = {"meta": meta(args.small), "sections": sections}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (out_dir / "summary.md").write_text(_markdown(summary))

    if args.ab:
        st.add_ab_candidates(args.ab)  # joins _names(): the step and sharding sections
    device = run("device", lambda: device_section(args.small))
    write()
    copy_bw = device["copy_bandwidth"] if device else None
    # The compile cases last: their time on a GPU is the least known (five
    # candidates x 250 leaves and 8 blocks, not yet run on a GPU), and the
    # shell's hard limit should cut them, not the short sections after them.
    for name, fn in (
        ("step", lambda: step_section(args.small, args.rounds, copy_bw)),
        ("sharding", lambda: sharding_section(args.small)),
        ("experiments", lambda: experiments_section(args.small, out_dir)),
        ("sharding-tests", lambda: sharding_tests_section(args.small)),
        ("compile", lambda: compile_section(args.small)),
    ):
        run(name, fn)
        write()
    print(f"[gpu_check] wrote {out_dir / 'summary.json'} and {out_dir / 'summary.md'}")
    return 0 if all(s["ok"] for s in sections.values()) else 1


def meta(small: bool) -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "small": small,
        "jax": jax.__version__,
        "optax": optax.__version__,
        "adaptive_moments": am.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average": list(os.getloadavg()),
    }


if __name__ == "__main__":
    sys.exit(main(ARGS))
