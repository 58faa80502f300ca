"""CaAdam's factor S: the paper architectures' table (docs/caadam.md §2), the edge
cases of docs/caadam.md §4 and every strategy x structure against the NumPy
reference.

The architectures are written as Keras trainable-variable lists, ``(path,
shape)`` in Keras order (construction order; kernel before bias, BN gamma
before beta), and the layer tables are built with that order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaptive_moments as am
from adaptive_moments import _caadam_scales

try:
    import reference_numpy as ref
except ImportError:  # tests/ imported as a package
    from tests import reference_numpy as ref

VarList = list[tuple[str, tuple[int, ...]]]


# ---------------------------------------------------------------------------
# Keras variable lists of the paper's models (docs/caadam.md §7)


class _Namer:
    """Keras' automatic layer names: conv2d, conv2d_1, ..."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str) -> str:
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        return kind if n == 0 else f"{kind}_{n}"


def resnet20_vars(num_classes: int) -> VarList:
    """ResNet-20 (6n+2, n = 3) for 32x32x3 inputs: 86 trainable variables."""
    name = _Namer()
    out: VarList = []

    def conv(k: int, cin: int, cout: int) -> None:
        layer = name("conv2d")
        out.extend([(f"{layer}/kernel", (k, k, cin, cout)), (f"{layer}/bias", (cout,))])

    def bn(c: int) -> None:
        layer = name("batch_normalization")
        out.extend([(f"{layer}/gamma", (c,)), (f"{layer}/beta", (c,))])

    conv(3, 3, 16)
    bn(16)
    cin = 16
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            conv(3, cin, filters)
            bn(filters)
            conv(3, filters, filters)
            bn(filters)
            if stage > 0 and block == 0:  # 1x1 projection shortcut (stride 2)
                conv(1, cin, filters)
                bn(filters)
            cin = filters
    layer = name("dense")
    out.extend([(f"{layer}/kernel", (64, num_classes)), (f"{layer}/bias", (num_classes,))])
    return out


def mlp_vars(hidden: Sequence[int], inputs: int = 8) -> VarList:
    """Dense(relu) hidden layers and a Dense(1) output."""
    name = _Namer()
    out: VarList = []
    fan_in = inputs
    for units in [*hidden, 1]:
        layer = name("dense")
        out.extend([(f"{layer}/kernel", (fan_in, units)), (f"{layer}/bias", (units,))])
        fan_in = units
    return out


def shape_tree(var_list: VarList) -> dict[str, Any]:
    return ref.nest({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in var_list})


def keras_table(var_list: VarList, **kw: Any) -> am.LayerTable:
    return am.layer_table(shape_tree(var_list), order=[p for p, _ in var_list], **kw)


def flat_scales(var_list: VarList, strategy: str, structure: str, **kw: Any) -> dict[str, float]:
    """``am.caadam_scales`` with a Keras-ordered table, flattened by path."""
    tree = shape_tree(var_list)
    table = keras_table(var_list)
    scales = am.caadam_scales(tree, strategy, layers=table, structure=structure, **kw)
    flat, _ = jax.tree_util.tree_flatten_with_path(scales)
    out = {am.normalize_path(p): np.asarray(s, np.float64) for p, s in flat}
    assert all(s.shape == () for s in out.values())  # no stacked leaves here
    return {p: float(s) for p, s in out.items()}


# docs/caadam.md §2 table: (#vars, c_min, median, c_max, c used for every kernel,
# S_add kernels, S_add 1-D, S_mul kernels, S_mul 1-D, S_depth max).
PAPER_TABLE = [
    (
        "resnet20_cifar10",
        resnet20_vars(10),
        86,
        432,
        6912,
        36864,
        640,
        1.9195,
        2.0133,
        4.7483,
        5.5663,
        1.984,
    ),
    (
        "resnet20_cifar100",
        resnet20_vars(100),
        86,
        432,
        7808,
        36864,
        6400,
        1.1813,
        2.0056,
        1.3596,
        5.4942,
        1.984,
    ),
    ("mlp_64_32", mlp_vars([64, 32]), 6, 32, 512, 2048, 32, 1.95, 2.0133, 5.0, 5.5663, 1.782),
    (
        "mlp_128_64_32",
        mlp_vars([128, 64, 32]),
        8,
        32,
        1536,
        8192,
        32,
        1.95,
        1.9702,
        5.0,
        5.1742,
        1.834,
    ),
    (
        "mlp_128_128_64",
        mlp_vars([128, 128, 64]),
        8,
        64,
        4608,
        16384,
        64,
        1.95,
        1.9634,
        5.0,
        5.1146,
        1.834,
    ),
    (
        "mlp_256_128_64_32",
        mlp_vars([256, 128, 64, 32]),
        10,
        32,
        2048,
        32768,
        32,
        1.95,
        1.9651,
        5.0,
        5.1294,
        1.866,
    ),
    (
        "mlp_128x5",
        mlp_vars([128] * 5),
        12,
        128,
        16384,
        16384,
        128,
        1.95,
        1.9575,
        5.0,
        5.0638,
        1.888,
    ),
    (
        "mlp_1024_256_64_16",
        mlp_vars([1024, 256, 64, 16]),
        10,
        16,
        8192,
        262144,
        16,
        1.95,
        1.9519,
        5.0,
        5.0158,
        1.866,
    ),
]


def _close_to_table(x: float, printed: float) -> bool:
    """Equal to a value printed to 4-5 significant digits (half a last digit)."""
    decimals = len(repr(printed).split(".")[1]) if "." in repr(printed) else 0
    return abs(x - printed) <= 0.5 * 10.0 ** -max(decimals, 3) + 1e-12


@pytest.mark.parametrize("row", PAPER_TABLE, ids=[r[0] for r in PAPER_TABLE])
def test_paper_table(row: tuple):
    (_, var_list, n_vars, c_min, med, c_max, c_used, s_add_k, s_add_1, s_mul_k, s_mul_1, d_max) = (
        row
    )
    assert len(var_list) == n_vars
    table = keras_table(var_list)
    assert [r.path for r in table.rows] == [p for p, _ in var_list]
    kernels = [p for p, s in var_list if len(s) > 1]
    one_d = [p for p, s in var_list if len(s) == 1]

    # The statistics and the count every kernel gets (name collision on "kernel").
    st = ref.ca_structure(ref.make_vars(var_list), "reference")
    assert (st.c_min, st.median, st.c_max) == (c_min, med, c_max)
    assert {float(st.conn[p][0]) for p in kernels} == {c_used}
    assert {float(st.conn[p][0]) for p in one_d} == {0.0}
    ours = _caadam_scales.UnitData(table.rows, "reference")
    assert (ours.c_min, ours.median, ours.c_max) == (c_min, med, c_max)
    assert {float(ours.conn[p][0]) for p in kernels} == {c_used}
    assert {float(ours.conn[p][0]) for p in one_d} == {0.0}

    for strategy, want_k, want_1 in (
        ("additive", s_add_k, s_add_1),
        ("multiplicative", s_mul_k, s_mul_1),
    ):
        s = flat_scales(var_list, strategy, "reference")
        s_ref = ref.caadam_scales(ref.make_vars(var_list), strategy, structure="reference")
        for p in s:
            np.testing.assert_allclose(s[p], s_ref[p][0], rtol=1e-12, err_msg=p)
        assert len({float(s[p]) for p in kernels}) == 1
        assert len({float(s[p]) for p in one_d}) == 1
        assert _close_to_table(float(s[kernels[0]]), want_k), (strategy, s[kernels[0]])
        assert _close_to_table(float(s[one_d[0]]), want_1), (strategy, s[one_d[0]])

    s = flat_scales(var_list, "depth", "reference")
    depth_values = np.array([float(s[p]) for p, _ in var_list])
    assert _close_to_table(depth_values.min(), 1.000)
    assert _close_to_table(depth_values.max(), d_max)
    # Geometric ramp over the variable index: first (1+1)^((n-1)/n), last 1.
    np.testing.assert_allclose(
        depth_values, 2.0 ** ((n_vars - 1 - np.arange(n_vars)) / n_vars), rtol=1e-14
    )


# ---------------------------------------------------------------------------
# docs/caadam.md §4 edge cases

DEGENERATE = [  # kernel counts [100, 10, 10]: median == c_min < c_max
    ("dense/kernel", (10, 10)),
    ("dense/bias", (10,)),
    ("dense_1/kernel", (10, 1)),
    ("dense_1/bias", (1,)),
    ("dense_2/kernel", (1, 10)),
    ("dense_2/bias", (10,)),
]


@pytest.mark.parametrize("strategy", ["additive", "multiplicative"])
def test_median_equals_c_min_reference_gives_nan_and_inf(strategy: str):
    """Reference: kernels get c = med (0/0 = NaN), 1-D tensors c = 0 (x/0 = +inf)."""
    for s in (
        flat_scales(DEGENERATE, strategy, "reference"),
        {
            p: v[0]
            for p, v in ref.caadam_scales(
                ref.make_vars(DEGENERATE), strategy, structure="reference"
            ).items()
        },
    ):
        for p, shape in DEGENERATE:
            if len(shape) > 1:
                assert np.isnan(s[p]), p
            else:
                assert np.isposinf(s[p]), p
    depth = flat_scales(DEGENERATE, "depth", "reference")
    assert all(np.isfinite(v) for v in depth.values())


@pytest.mark.parametrize("strategy", ["additive", "multiplicative"])
def test_median_equals_c_min_layer_and_variable_are_finite(strategy: str):
    """Safe structures: a zero denominator is distance 0, so S = 1 there."""
    big = 0.05 if strategy == "additive" else 5.0  # c = c_max: a = -1
    want = {
        "layer": {
            "dense/kernel": big,
            "dense/bias": big,
            "dense_1/kernel": 1.0,
            "dense_1/bias": 1.0,
            "dense_2/kernel": 1.0,
            "dense_2/bias": 1.0,
        },
        "variable": {
            "dense/kernel": big,
            "dense/bias": 1.0,
            "dense_1/kernel": 1.0,
            "dense_1/bias": 1.0,
            "dense_2/kernel": 1.0,
            "dense_2/bias": 1.0,
        },
    }
    for structure, expected in want.items():
        s = flat_scales(DEGENERATE, strategy, structure)
        s_ref = ref.caadam_scales(ref.make_vars(DEGENERATE), strategy, structure=structure)
        for p, v in expected.items():
            np.testing.assert_allclose(s[p], v, rtol=1e-14, err_msg=(structure, p))
            np.testing.assert_allclose(s_ref[p][0], v, rtol=1e-14, err_msg=(structure, p))


def test_median_equals_c_min_keras_preset_makes_every_parameter_non_finite():
    """docs/caadam.md §8: 141/141 parameters non-finite after one step, like Keras."""
    rng = np.random.default_rng(5)
    params = {p: rng.standard_normal(s) for p, s in DEGENERATE}
    grads = {p: rng.standard_normal((1, *s)) for p, s in DEGENERATE}
    assert sum(a.size for a in params.values()) == 141
    for strategy in ("additive", "multiplicative"):
        want = ref.caadam_run(
            list(params.items()),
            grads,
            strategy=strategy,
            structure="reference",
            eps_mode="keras",
            eps=1e-7,
        )
        opt = am.caadam_keras(1e-3, strategy, layers=keras_table(DEGENERATE))
        got = ref.jax_trajectories({"x": (opt, jnp.float32)}, params, grads)["x"]["traj"]
        for p in params:
            assert not np.isfinite(want[p][0]).any(), p
            assert not np.isfinite(got[p][0]).any(), p


@pytest.mark.parametrize("structure", ["layer", "variable", "reference"])
def test_c_min_equals_c_max_gives_one(structure: str):
    var_list = [("a/kernel", (4, 4)), ("a/bias", (4,)), ("b/kernel", (2, 8)), ("b/bias", (8,))]
    for strategy in ("additive", "multiplicative"):
        assert set(flat_scales(var_list, strategy, structure).values()) == {1.0}
    depth = flat_scales(var_list, "depth", structure)
    assert max(depth.values()) > 1.0  # depth is unaffected


@pytest.mark.parametrize("structure", ["layer", "variable", "reference"])
def test_no_2d_parameter_gives_one(structure: str):
    var_list = [("norm/scale", (5,)), ("norm/bias", (5,)), ("temp", ())]
    for strategy in ("additive", "multiplicative"):
        assert set(flat_scales(var_list, strategy, structure).values()) == {1.0}


def test_single_layer():
    """Plain Adam from the connection strategies; depth (1+g)^(1/2) and 1 in
    the reference (d_m = 2 variables), 1 for the one layer in "layer"."""
    var_list = [("dense/kernel", (3, 4)), ("dense/bias", (4,))]
    for structure in ("layer", "variable", "reference"):
        for strategy in ("additive", "multiplicative"):
            assert set(flat_scales(var_list, strategy, structure).values()) == {1.0}
    s = flat_scales(var_list, "depth", "reference")
    np.testing.assert_allclose(
        [s["dense/kernel"], s["dense/bias"]], [math.sqrt(2.0), 1.0], rtol=1e-15
    )
    assert set(flat_scales(var_list, "depth", "layer").values()) == {1.0}


def test_even_count_median_is_averaged():
    """Kernel counts [10, 20, 40, 80]: median 30 (np.median), by hand."""
    var_list = [
        ("l0/kernel", (2, 5)),
        ("l0/bias", (5,)),
        ("l1/kernel", (4, 5)),
        ("l1/bias", (5,)),
        ("l2/kernel", (5, 8)),
        ("l2/bias", (8,)),
        ("l3/kernel", (8, 10)),
        ("l3/bias", (10,)),
    ]
    a = np.array([1.0, 0.5, -0.2, -1.0])  # (30-10)/20, (30-20)/20, -(40-30)/50, -(80-30)/50
    want = {
        ("additive", False): 1 + 0.95 * a,
        ("multiplicative", False): 5.0 ** np.abs(a),
        ("multiplicative", True): 5.0**a,
    }
    for (strategy, signed), values in want.items():
        s = flat_scales(var_list, strategy, "layer", signed=signed)
        got = [s[f"l{i}/kernel"] for i in range(4)]
        np.testing.assert_allclose(got, values, rtol=1e-14, err_msg=(strategy, signed))
        # Every parameter of a layer shares its S in "layer".
        assert all(s[f"l{i}/bias"] == s[f"l{i}/kernel"] for i in range(4))


def test_layer_sums_its_2d_parameters():
    """An LSTM-like layer with kernel and recurrent_kernel: c is their sum."""
    var_list = [
        ("lstm/kernel", (3, 8)),
        ("lstm/recurrent_kernel", (2, 8)),
        ("lstm/bias", (8,)),
        ("dense/kernel", (2, 5)),
        ("dense/bias", (5,)),
        ("out/kernel", (5, 1)),
    ]
    st = ref.ca_structure(ref.make_vars(var_list), "layer")
    assert st.conn["lstm/kernel"][0] == st.conn["lstm/bias"][0] == 40.0
    assert (st.c_min, st.median, st.c_max) == (5.0, 10.0, 40.0)
    ours = _caadam_scales.UnitData(keras_table(var_list).rows, "layer")
    assert (ours.c_min, ours.median, ours.c_max) == (5.0, 10.0, 40.0)
    s = flat_scales(var_list, "additive", "layer")
    np.testing.assert_allclose(
        [s["lstm/kernel"], s["dense/kernel"], s["out/kernel"]], [0.05, 1.0, 1.95]
    )


# ---------------------------------------------------------------------------
# every strategy x structure, stacked leaves included, against the reference

MIXED = [
    ("embed/embedding", (11, 4)),
    ("conv/kernel", (3, 3, 4, 6)),
    ("conv/bias", (6,)),
    ("blocks/attn/kernel", (3, 6, 6)),  # stacked (axis 0)
    ("blocks/attn/bias", (3, 6)),
    ("blocks/mlp/kernel", (3, 6, 12)),  # same stack: slice-major with attn
    ("blocks/mlp/bias", (3, 12)),
    ("norm/scale", (12,)),
    ("norm/bias", (12,)),
    ("head/kernel", (12, 3)),
    ("head/bias", (3,)),
    ("temp", ()),
]
MIXED_STACK = {p: 0 for p, _ in MIXED if p.startswith("blocks/")}


@pytest.mark.parametrize(
    "strategy,structure,signed,gamma",
    [
        (st, su, sg, g)
        for (st, g), su, sg in itertools.product(
            [
                ("additive", None),
                ("additive", 0.5),
                ("multiplicative", None),
                ("multiplicative", 0.5),
                ("depth", None),
                ("depth", 2.0),
            ],
            ["layer", "variable", "reference"],
            [False, True],
        )
        if not (sg and st != "multiplicative")
    ],
)
def test_scales_match_reference(strategy: str, structure: str, signed: bool, gamma: float | None):
    tree = shape_tree(MIXED)
    table = am.layer_table(tree, order=[p for p, _ in MIXED], stack_axes=MIXED_STACK)
    assert [r.path for r in table.rows] == [p for p, _ in MIXED]
    ours = am.caadam_scales(tree, strategy, gamma, layers=table, structure=structure, signed=signed)
    flat, _ = jax.tree_util.tree_flatten_with_path(ours)
    ours = {am.normalize_path(p): np.asarray(s) for p, s in flat}
    want = ref.caadam_scales(ref.make_vars(MIXED, MIXED_STACK), strategy, gamma, structure, signed)
    for p, shape in MIXED:
        stack = MIXED_STACK.get(p)
        got = ours[p].reshape(-1)
        if got.size > 1:  # per-slice S broadcasts along the stack axis
            assert np.shape(ours[p])[stack] == shape[stack] == got.size
        else:
            got = np.full(want[p].shape, got[0])
        assert got.shape == want[p].shape, p
        np.testing.assert_allclose(got, want[p], rtol=1e-13, err_msg=p)
    if strategy == "depth" and structure != "reference":
        assert len(set(want["blocks/attn/kernel"])) == 3  # slices differ


def test_stacked_units_are_slice_major():
    """Two stacked layers sharing a stack: depths attn0, mlp0, attn1, mlp1, ..."""
    table = am.layer_table(shape_tree(MIXED), order=[p for p, _ in MIXED], stack_axes=MIXED_STACK)
    units = ref.layer_units(ref.make_vars(MIXED, MIXED_STACK))
    index = {u: i for i, u in enumerate(units)}
    for r in table.rows:
        want = tuple(index[(r.layer, i)] for i in range(r.num_slices))
        assert r.depth == want, r.path
    assert units[2:8] == [
        ("blocks/attn", 0),
        ("blocks/mlp", 0),
        ("blocks/attn", 1),
        ("blocks/mlp", 1),
        ("blocks/attn", 2),
        ("blocks/mlp", 2),
    ]


def test_scales_feed_the_update():
    """S multiplies the whole Adam step: at t = 1 the update is
    ``-lr * S * g / (|g| + eps)`` (optax placement)."""
    var_list = [
        ("a/kernel", (4, 3)),
        ("a/bias", (3,)),
        ("b/kernel", (3, 2)),
        ("b/bias", (2,)),
        ("c/kernel", (2, 7)),
    ]
    tree = ref.nest({p: jnp.ones(s) for p, s in var_list})
    s = flat_scales(var_list, "multiplicative", "layer", signed=True)
    assert len(set(s.values())) == 3
    opt = am.caadam(1e-2, "multiplicative", layers=keras_table(var_list), signed=True)
    grads = jax.tree.map(lambda x: -0.3 * x, tree)
    u, _ = jax.jit(lambda g: opt.update(g, opt.init(tree)))(grads)
    for path, x in jax.tree_util.tree_leaves_with_path(u):
        want = -1e-2 * s[am.normalize_path(path)] * -0.3 / (0.3 + 1e-8)
        np.testing.assert_allclose(np.asarray(x), want, rtol=1e-6)
