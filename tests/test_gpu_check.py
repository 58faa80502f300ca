"""``benchmarks/gpu_check.py --small`` runs on CPU and writes its summary.

The GPU check is run only when a GPU is lent, for minutes: this smoke test
keeps it from rotting in between. It runs every section at toy sizes in a
subprocess (its own JAX backend: 8 virtual CPU devices, standard promotion)
and checks the summary's structure, not its figures.
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_small_writes_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--small", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    md = (tmp_path / "summary.md").read_text()

    assert summary["meta"]["small"] is True
    assert summary["meta"]["num_devices"] == 8
    sections = summary["sections"]
    assert set(sections) == {"device", "step", "compile", "sharding", "sharding-tests",
                             "experiments"}
    assert all(s["ok"] for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    for name in sections:
        assert f"## {name} " in md

    assert sections["device"]["result"]["copy_bandwidth"] > 0
    names = {"adam", "caadam_depth", "set_adam", "adam_control"}  # --small's subset
    for case in sections["step"]["result"].values():
        assert set(case["rows"]) == names
        for row in case["rows"].values():
            assert row["median_ms"] > 0 and row["bytes_xla"] > 0
            assert 0 < row["roofline_fraction_floor"]
    compile_cases = sections["compile"]["result"]
    assert set(compile_cases) == {"compile-40", "compile-deep"}
    for case in compile_cases.values():
        assert set(case["rows"]) == names
        assert case["rows"]["adam"]["ratio"] == 1.0
    sharding = sections["sharding"]["result"]
    assert sharding["devices"] == 8 and set(sharding["rows"]) == names
    assert all(r["ok"] for r in sharding["rows"].values())
    exp = sections["experiments"]["result"]
    assert exp["rc"] == 0 and "--batching vmap" in exp["command"] and exp["reports"]
