"""Path-and-shape layer tables (``am.layer_table``): framework-agnostic.

Expected values come from the model definitions written here (fan-in x
fan-out of each layer) and from the formulas of docs/caadam.md §3,
evaluated independently in :func:`s_mul` / :func:`s_depth`.
"""

from __future__ import annotations

import ast
import graphlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_moments as am


def s_mul(c: float, counts: list[float], gamma: float = 5.0) -> float:
    """docs/caadam.md §3, multiplicative, as coded (|sigma|)."""
    med, lo, hi = float(np.median(counts)), min(counts), max(counts)
    if c == 0:
        return 1.0  # "layer" structure: layers without connections get S = 1
    sigma = (med - c) / (med - lo) if c <= med else (c - med) / (hi - med)
    return gamma ** abs(sigma)


def s_depth(d: int, d_m: int, gamma: float = 1.0) -> float:
    """docs/caadam.md §3, depth strategy."""
    return (1 + gamma) ** ((d_m - (1 + d)) / d_m)


def mlp(sizes: list[int], names: list[str] | None = None) -> dict:
    names = names or [f"Dense_{i}" for i in range(len(sizes) - 1)]
    return {
        n: {"kernel": jnp.ones((a, b)), "bias": jnp.zeros(b)}
        for n, a, b in zip(names, sizes[:-1], sizes[1:])
    }


def test_fallback_order_is_natural_and_deterministic():
    params = mlp([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 2])  # Dense_0 .. Dense_10
    reordered = dict(reversed(list(params.items())))  # insertion order must not matter
    table = am.layer_table(params)
    assert table == am.layer_table(reordered)
    assert table == am.layer_table(jax.tree.map(lambda x: x, params))  # sorted by jax
    layers = list(dict.fromkeys(r.layer for r in table.rows))
    assert layers == [f"Dense_{i}" for i in range(11)]  # Dense_2 before Dense_10
    # Keras creation order inside a layer: kernel, then bias; both share the depth.
    assert [r.leaf_name for r in table.rows[:2]] == ["kernel", "bias"]
    assert [table[f"Dense_{i}/bias"].depth for i in (2, 10)] == [(2,), (10,)]
    assert table.num_depths == 11


def test_shape_dtype_struct_tree_gives_the_same_table():
    params = mlp([8, 16, 4])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert am.layer_table(abstract) == am.layer_table(params)
    row = am.layer_table(abstract)["Dense_0/kernel"]
    assert (row.fan_in, row.fan_out, row.connections) == (8, 16, 128)


def test_fans_follow_the_jax_convention_and_biases_have_none():
    params = {
        "conv": {"kernel": jnp.zeros((3, 3, 16, 32)), "bias": jnp.zeros(32)},
        "attn": {"bias": jnp.zeros((2, 4))},  # 2-D bias (DenseGeneral): no connections
        "norm": {"scale": jnp.zeros(32)},
        "free": {"w": jnp.zeros((5, 7))},
    }
    table = am.layer_table(params)
    conv = table["conv/kernel"]
    assert (conv.fan_in, conv.fan_out) == (3 * 3 * 16, 3 * 3 * 32)  # HWIO
    assert conv.connections == 3 * 3 * 16 * 32  # number of weights
    assert table["attn/bias"].connections == 0
    assert table["norm/scale"].connections == 0
    assert table["free/w"].connections == 35


def test_fan_fn_overrides_with_two_or_three_numbers():
    params = {"eqx": {"weight": jnp.zeros((4, 3))}}  # PyTorch/equinox layout (out, in)

    def torch_layout(path, shape):
        return (shape[1], shape[0]) if path.endswith("weight") else None

    row = am.layer_table(params, fan_fn=torch_layout)["eqx/weight"]
    assert (row.fan_in, row.fan_out, row.connections) == (3, 4, 12)
    row = am.layer_table(params, fan_fn=lambda p, s: (3, 4, 99))["eqx/weight"]
    assert row.connections == 99
    with pytest.raises(ValueError, match="fan_fn"):
        am.layer_table(params, fan_fn=lambda p, s: (1,))


def test_order_sets_depth_and_unknown_names_raise():
    params = mlp([2, 3, 4], names=["a_second", "z_first"])
    table = am.layer_table(params, order=["z_first/kernel", "a_second"])
    assert [r.layer for r in table.rows] == ["z_first", "z_first", "a_second", "a_second"]
    assert table["a_second/bias"].depth == (1,)
    with pytest.raises(ValueError, match="neither a parameter nor a layer"):
        am.layer_table(params, order=["nope"])


def test_explicit_depths_are_renumbered_densely():
    params = mlp([2, 3, 4, 5], names=["q", "k", "out"])
    table = am.layer_table(params, depths={"q": 10, "k": 10, "out": 30})
    assert table["q/kernel"].depth == table["k/kernel"].depth == (0,)
    assert table["out/bias"].depth == (1,)
    assert table.num_depths == 2


def test_linen_variables_dict_labels_only_params():
    params = mlp([4, 8, 2])
    stats = {"bn": {"mean": jnp.zeros(8), "var": jnp.ones(8)}}
    variables = {"params": params, "batch_stats": stats}
    table = am.layer_table(variables)
    assert table == am.layer_table(params)  # paths without "params/", stats skipped
    assert table.lookup("params/Dense_0/kernel", "test").path == "Dense_0/kernel"
    with pytest.raises(ValueError, match="batch_stats.*not trained"):
        table.lookup("batch_stats/bn/mean", "test")
    # {'params': ...} alone is a variables dict too; collection=None keeps the tree.
    assert am.layer_table({"params": params}) == table
    assert "params/Dense_0/kernel" in am.layer_table({"params": params}, collection=None)
    # A model whose top-level names are not collections is labelled as given.
    odd = {"params": params, "head": {"kernel": jnp.zeros((2, 2))}}
    assert "head/kernel" in am.layer_table(odd)
    with pytest.raises(ValueError, match="collection"):
        am.layer_table(params, collection="batch_stats")


def test_stacked_leaves_get_one_depth_per_slice_slice_major():
    L = 3
    params = {
        "embed": {"embedding": jnp.zeros((10, 4))},
        "layers": {
            "zlin": {"kernel": jnp.zeros((L, 4, 8)), "bias": jnp.zeros((L, 8))},
            "alin": {"kernel": jnp.zeros((L, 8, 4)), "bias": jnp.zeros((L, 4))},
        },
        "head": {"kernel": jnp.zeros((4, 2))},
    }
    table = am.layer_table(
        params, order=["embed", "layers/zlin", "layers/alin", "head"], stack_axes={"layers/.*": 0}
    )
    z, a = table["layers/zlin/kernel"], table["layers/alin/kernel"]
    assert z.stack_axis == 0 and z.num_slices == L and z.slice_shape == (4, 8)
    assert (z.fan_in, z.fan_out, z.connections) == (4, 8, 32)  # per slice
    assert z.depth == (1, 3, 5) and a.depth == (2, 4, 6)
    assert table["layers/zlin/bias"].depth == (1, 3, 5)
    assert table["head/kernel"].depth == (7,)
    # Each slice its own depth factor (docs/caadam.md §3, depth strategy).
    s = am.caadam_scales(params, "depth", layers=table)
    np.testing.assert_allclose(
        np.ravel(s["layers"]["zlin"]["kernel"]), [s_depth(d, 8) for d in (1, 3, 5)], rtol=1e-12
    )


def test_two_stacks_with_the_same_length_are_not_interleaved():
    def stack():
        return {"d": {"kernel": jnp.zeros((2, 4, 4))}}

    params = {"model": {"enc": stack(), "dec": stack(), "mid": {"kernel": jnp.zeros((4, 4))}}}
    table = am.layer_table(
        params, order=["model/enc/d", "model/mid", "model/dec/d"], stack_axes={".*/d": 0}
    )
    assert table["model/enc/d/kernel"].depth == (0, 1)
    assert table["model/mid/kernel"].depth == (2,)
    assert table["model/dec/d/kernel"].depth == (3, 4)


def test_unboxed_bias_next_to_a_stacked_kernel_is_stacked_too():
    params = {"layers": {"kernel": jnp.zeros((8, 3, 8)), "bias": jnp.zeros((8, 3))}}
    table = am.layer_table(params, stack_axes={"layers/kernel": 1})
    assert table["layers/bias"].stack_axis == 1
    assert table["layers/bias"].depth == table["layers/kernel"].depth == (0, 1, 2)


def test_lora_adapters_belong_to_their_base_layer():
    params = {
        "ll": {  # nnx.LoRALinear
            "kernel": jnp.zeros((4, 6)),
            "lora": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((2, 6))},
        },
        "wrap": {  # nnx.LoRA(base_module=...)
            "base_module": {"kernel": jnp.zeros((6, 3))},
            "lora_a": jnp.zeros((6, 2)),
            "lora_b": jnp.zeros((2, 3)),
        },
    }
    table = am.layer_table(params)
    assert table["ll/lora/lora_a"].layer == "ll"
    assert table["wrap/lora_b"].layer == "wrap/base_module"
    a = table["ll/lora/lora_a"]
    assert (a.fan_in, a.fan_out, a.connections) == (4, 2, 8)
    assert table["ll/lora/lora_b"].depth == table["ll/kernel"].depth


def test_format_shows_every_column():
    params = {
        "layers": {"kernel": jnp.zeros((3, 4, 4))},
        "out": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)},
    }
    table = am.layer_table(params, order=["layers", "out"], stack_axes={"layers": 0})
    text = table.format("multiplicative")
    header = text.splitlines()[0].split()
    assert header == ["path", "layer", "depth", "fan_in", "fan_out", "connections", "stack",
                      "S[multiplicative]"]
    line = next(x for x in text.splitlines() if x.startswith("layers/kernel"))
    assert line.split()[2:7] == ["0..2", "4", "4", "16", "0"]
    # Layers: 3 slices with 16 connections, one with 8: median 16, c_min 8.
    out_line = next(x for x in text.splitlines() if x.startswith("out/kernel"))
    assert out_line.split()[-1] == f"{s_mul(8, [16, 16, 16, 8]):.4f}"
    assert "S[" not in table.format(None)
    assert repr(table) == "LayerTable(3 parameters, 4 depth levels)"


def test_caadam_with_a_table_under_partition_and_masked():
    params = mlp([6, 8, 4, 2])  # kernels 48, 32, 8 connections
    table = am.layer_table(params)
    counts = [48.0, 32.0, 8.0]
    labels = jax.tree_util.tree_map_with_path(
        lambda p, _: "ca" if p[-1].key == "kernel" else "sgd", params
    )
    lr = 1e-2
    tx = optax.partition({"ca": am.caadam(lr, layers=table), "sgd": optax.sgd(lr)}, labels)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.3), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    # Step 1 of Adam is -lr * g / (|g| + eps) = -lr; CaAdam multiplies by S.
    for name, c in zip(["Dense_0", "Dense_1", "Dense_2"], counts):
        np.testing.assert_allclose(
            updates[name]["kernel"], -lr * s_mul(c, counts), rtol=1e-5
        )
        np.testing.assert_allclose(updates[name]["bias"], -lr * 0.3, rtol=1e-5)
    # Same S through optax.masked (the statistics come from the whole table).
    mask = jax.tree.map(lambda lab: lab == "ca", labels)
    masked = optax.masked(am.caadam(lr, layers=table), mask)
    updates, _ = masked.update(grads, masked.init(params), params)
    np.testing.assert_allclose(updates["Dense_2"]["kernel"], -lr * s_mul(8, counts), rtol=1e-5)


def test_set_adam_reduces_a_stacked_leaf_per_slice():
    key = jax.random.key(0)
    stacked = {"layers": {"kernel": jax.random.normal(key, (3, 4, 5))}}
    table = am.layer_table(stacked, stack_axes={"layers": 0})
    per_slice, whole, split = am.set_adam(1e-2, layers=table), am.set_adam(1e-2), am.set_adam(1e-2)
    s1, s3 = per_slice.init(stacked), whole.init(stacked)
    s2 = split.init({f"s{i}": stacked["layers"]["kernel"][i] for i in range(3)})
    per_slice, whole, split = (jax.jit(t.update) for t in (per_slice, whole, split))
    g1 = stacked
    for _ in range(3):
        g1 = jax.tree.map(lambda x: jnp.sin(3.0 * x) * jnp.arange(1.0, 6.0)[None, None, :], g1)
        g2 = {f"s{i}": g1["layers"]["kernel"][i] for i in range(3)}
        u1, s1 = per_slice(g1, s1)
        u2, s2 = split(g2, s2)  # three independent layers
        u3, s3 = whole(g1, s3)
        for i in range(3):
            np.testing.assert_allclose(u1["layers"]["kernel"][i], u2[f"s{i}"], rtol=1e-6)
    # Reducing the whole leaf as one layer is a different algorithm.
    assert not np.allclose(u3["layers"]["kernel"], u1["layers"]["kernel"], rtol=1e-3)


# ---------------------------------------------------------------------------
# package layout: one concept per module, imports only downwards

PACKAGE_DIR = pathlib.Path(am.__file__).parent
MAX_MODULE_LINES = 500


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its body)."""
    files = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}

    def target(name: str) -> str:
        # `from pkg import name`: a module when one has that name, else the package.
        return name if name in files else name.rpartition(".")[0]

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith(am.__name__ + ".")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base == am.__name__ or base.startswith(am.__name__ + "."):
                    edges |= {target(f"{base}.{a.name}") for a in node.names}
        graph[module] = {e for e in edges if e in files and e != module}
    return graph


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_library_import_graph_has_no_cycle():
    graph = _package_imports()
    assert "adaptive_moments._table" in graph["adaptive_moments._labeler"]  # parsed
    experiments = f"{am.__name__}.experiments"
    library = {m: e for m, e in graph.items() if not m.startswith(experiments)}
    _assert_acyclic(library)
    # No library module imports the package itself or the experiments (upward).
    upward = {m for m in graph if m == am.__name__ or m.startswith(experiments)}
    assert not [m for m, e in library.items() if m != am.__name__ and e & upward]


def test_experiments_import_graph_has_no_cycle():
    graph = _package_imports()
    assert any(e for m, e in graph.items() if m.startswith(f"{am.__name__}.experiments."))
    _assert_acyclic(graph)


def test_library_modules_stay_short():
    lengths = {p.name: len(p.read_text().splitlines()) for p in PACKAGE_DIR.glob("*.py")}
    assert "flax.py" in lengths
    assert {n: k for n, k in lengths.items() if k > MAX_MODULE_LINES} == {}
