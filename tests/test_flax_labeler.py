"""Layer tables from Flax models (``am.flax``), linen and nnx.

Every test checks depths, fans and S values against what the model
definition written here implies (fan-in x fan-out of each layer, forward
order, the formulas of docs/caadam.md §3 evaluated in :func:`s_mul` /
:func:`s_depth`), or against docs/caadam.md §2's table for ResNet-20.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaptive_moments as am
from adaptive_moments import _caadam_scales

TOKENS = jax.ShapeDtypeStruct((2, 5), jnp.int32)


def s_mul(c: float, counts: list[float], gamma: float = 5.0) -> float:
    """docs/caadam.md §3, multiplicative (|sigma|); zero denominators -> 0."""
    med, lo, hi = float(np.median(counts)), min(counts), max(counts)
    if c == 0 or lo == hi:
        return 1.0
    den = (med - lo) if c <= med else (hi - med)
    return gamma ** (abs(med - c) / den if den else 0.0)


def s_depth(d: int, d_m: int, gamma: float = 1.0) -> float:
    return (1 + gamma) ** ((d_m - (1 + d)) / d_m)


def scales(table: am.LayerTable, strategy: str, **kwargs) -> dict:
    """CaAdam's S per parameter path, through ``am.caadam_scales`` on the table."""
    tree = {r.path: jax.ShapeDtypeStruct(r.shape, jnp.float32) for r in table.rows}
    return am.caadam_scales(tree, strategy, layers=table, **kwargs)


def layer_depths(table: am.LayerTable) -> dict[str, tuple[int, ...]]:
    return {r.layer: r.depth for r in table.rows}


def fans(table: am.LayerTable, path: str) -> tuple[int, int, int]:
    r = table[path]
    return r.fan_in, r.fan_out, r.connections


# ---------------------------------------------------------------------------
# linen models


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(1)(x)


class LinenNamed(nn.Module):
    """Names that sort against the forward order."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(5, name="z_first")(x)
        x = nn.Dense(6, name="a_second")(x)
        for _ in range(11):  # Dense_0 .. Dense_10; jax.tree puts Dense_10 before Dense_2
            x = nn.Dense(4)(x)
        return x


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Conv(16, (3, 3), strides=2)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class LinenResBlock(nn.Module):
    filters: int
    strides: int

    @nn.compact
    def __call__(self, x, train):
        y = nn.Conv(self.filters, (3, 3), strides=self.strides)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        y = nn.Conv(self.filters, (3, 3))(y)
        y = nn.BatchNorm(use_running_average=not train)(y)
        if self.strides != 1 or x.shape[-1] != self.filters:
            # Keras' ResNet v1 builds the projection after the block's convs.
            x = nn.Conv(self.filters, (1, 1), strides=self.strides)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.relu(x + y)


class LinenResNet20(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3))(x)))
        for stage, filters in enumerate((16, 32, 64)):
            for block in range(3):
                x = LinenResBlock(filters, 2 if stage > 0 and block == 0 else 1)(x, train)
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class LinenTransformer(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(11, 8, name="embed")
        x = embed(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(
            nn.LayerNorm(name="ln")(x)
        )
        x = x + nn.Dense(8, name="a_down")(nn.relu(nn.Dense(16, name="z_up")(x)))
        return embed.attend(x)  # tied output projection


class LinenScanBlock(nn.Module):
    boxed: bool = True  # kernel partitioned (needs nn.scan's metadata_params)

    @nn.compact
    def __call__(self, x, _):
        init = nn.initializers.lecun_normal()
        if self.boxed:
            init = nn.with_partitioning(init, ("embed", "mlp"))
        x = nn.relu(nn.Dense(8, kernel_init=init, name="zlin")(x))
        return nn.Dense(8, name="alin")(x), None


def linen_stack(axis: int, metadata: bool):
    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8, name="inp")(x)
            scan = nn.scan(
                LinenScanBlock,
                variable_axes={"params": axis},
                split_rngs={"params": True},
                length=3,
                metadata_params={nn.PARTITION_NAME: "layers"} if metadata else {},
            )
            x, _ = scan(boxed=metadata, name="layers")(x, None)
            return nn.Dense(1, name="head")(x)

    return Stack()


class LinenLoRADense(nn.Module):
    """A user-written LoRA wrapper: a frozen base Dense plus two factors."""

    features: int
    rank: int = 2

    @nn.compact
    def __call__(self, x):
        a = self.param("lora_a", nn.initializers.normal(), (x.shape[-1], self.rank))
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
        return nn.Dense(self.features, name="base")(x) + x @ a @ b


# ---------------------------------------------------------------------------
# linen tests


def test_linen_mlp_depths_fans_and_s():
    table = am.flax.linen_layer_table(LinenMLP(), jnp.zeros((1, 4)))
    assert layer_depths(table) == {"Dense_0": (0,), "Dense_1": (1,), "Dense_2": (2,)}
    assert [fans(table, f"Dense_{i}/kernel") for i in range(3)] == [
        (4, 16, 64), (16, 8, 128), (8, 1, 8)]
    assert [r.module for r in table.rows] == ["Dense"] * 6
    counts = [64, 128, 8]
    s = scales(table, "multiplicative")
    for i, c in enumerate(counts):
        for leaf in ("kernel", "bias"):  # a layer shares its S
            np.testing.assert_allclose(s[f"Dense_{i}/{leaf}"], s_mul(c, counts), rtol=1e-12)
    sd = scales(table, "depth")
    np.testing.assert_allclose(sd["Dense_1/bias"], s_depth(1, 3), rtol=1e-12)


def test_linen_user_names_follow_the_forward_order():
    x = jnp.zeros((1, 3))
    table = am.flax.linen_layer_table(LinenNamed(), x)
    expected = {"z_first": 0, "a_second": 1, **{f"Dense_{i}": 2 + i for i in range(11)}}
    assert {k: v[0] for k, v in layer_depths(table).items()} == expected
    assert fans(table, "a_second/kernel") == (5, 6, 30)
    # Paths only (the fallback) cannot know this order; jax.tree even less.
    variables = jax.eval_shape(LinenNamed().init, jax.random.key(0), x)
    fallback = am.layer_table(variables["params"])
    assert fallback["z_first/kernel"].depth == (12,)
    assert fallback["Dense_10/kernel"].depth == (10,)
    # The same rows from the variables, given the traced order.
    same = am.layer_table(variables, order=[r.layer for r in table.rows])
    assert [r.path for r in same.rows] == [r.path for r in table.rows]


def test_linen_cnn_with_batchnorm():
    x = jax.ShapeDtypeStruct((2, 12, 12, 3), jnp.float32)
    table = am.flax.linen_layer_table(LinenCNN(), x, train=True)
    assert [r.path for r in table.rows] == [
        "Conv_0/kernel", "Conv_0/bias", "BatchNorm_0/scale", "BatchNorm_0/bias",
        "Conv_1/kernel", "Conv_1/bias", "BatchNorm_1/scale", "BatchNorm_1/bias",
        "Dense_0/kernel", "Dense_0/bias"]
    assert [r.depth[0] for r in table.rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # HWIO: fan-in kh*kw*in, fan-out kh*kw*out, connections = kernel weights.
    assert fans(table, "Conv_0/kernel") == (27, 72, 216)
    assert fans(table, "Conv_1/kernel") == (72, 144, 1152)
    assert fans(table, "BatchNorm_0/scale") == (0, 0, 0)
    assert table["BatchNorm_1/scale"].module == "BatchNorm"
    # batch_stats never labelled, whether or not the full variables are passed.
    variables = jax.eval_shape(LinenCNN().init, jax.random.key(0), x)
    assert set(variables) == {"params", "batch_stats"}
    assert set(am.layer_table(variables)) == set(table)
    counts = [216, 1152, 160]
    s = scales(table, "multiplicative")
    np.testing.assert_allclose(s["Conv_0/bias"], s_mul(216, counts), rtol=1e-12)
    np.testing.assert_allclose(s["BatchNorm_0/scale"], 1.0)  # no connections


def test_linen_resnet20_reproduces_the_reference_structure():
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    table = am.flax.linen_layer_table(LinenResNet20(), x)
    # docs/caadam.md §2: 86 variables, c_min / median / c_max 432 / 6912 / 36864.
    assert len(table) == 86
    units = _caadam_scales.UnitData(table.rows, "reference")
    assert (units.c_min, units.median, units.c_max) == (432, 6912, 36864)
    # Keras' variable order: conv kernel, conv bias, BN gamma, BN beta, ...
    assert [r.leaf_name for r in table.rows[:4]] == ["kernel", "bias", "scale", "bias"]
    assert table.rows[0].shape == (3, 3, 3, 16) and table.rows[-2].shape == (64, 10)
    kernels = [r.path for r in table.rows if len(r.shape) > 1]
    vectors = [r.path for r in table.rows if len(r.shape) <= 1]
    for strategy, k_value, v_value in (("multiplicative", 4.7483, 5.5663),
                                       ("additive", 1.9195, 2.0133)):
        s = scales(table, strategy, structure="reference")
        np.testing.assert_allclose([float(s[p]) for p in kernels], k_value, atol=5e-5)
        np.testing.assert_allclose([float(s[p]) for p in vectors], v_value, atol=5e-5)
    sd = scales(table, "depth", structure="reference")
    ramp = [float(sd[r.path]) for r in table.rows]
    assert round(ramp[0], 3) == 1.984 and ramp[-1] == 1.0
    assert all(a > b for a, b in zip(ramp, ramp[1:]))
    # The robust "layer" structure: each conv its own count (prod of its kernel).
    layer_counts = [math.prod(r.shape) for r in table.rows if len(r.shape) > 1]
    assert sorted(layer_counts)[:3] == [432, 512, 640] and np.median(layer_counts) == 6912
    s = scales(table, "multiplicative")
    for r in table.rows:
        if len(r.shape) > 1:
            np.testing.assert_allclose(s[r.path], s_mul(math.prod(r.shape), layer_counts))


def test_linen_transformer_attention_and_tied_embedding():
    table = am.flax.linen_layer_table(LinenTransformer(), TOKENS)
    for proj in ("query", "key", "value"):  # kernel (d, heads, head_dim)
        assert fans(table, f"attn/{proj}/kernel") == (8, 8, 64)
        assert fans(table, f"attn/{proj}/bias") == (0, 0, 0)  # 2-D bias, no connections
    assert fans(table, "attn/out/kernel") == (8, 8, 64)  # (heads, head_dim, d)
    assert fans(table, "embed/embedding") == (11, 8, 88)
    call = {k: v[0] for k, v in layer_depths(table).items()}
    assert call == {"embed": 0, "ln": 1, "attn/query": 2, "attn/key": 3, "attn/value": 4,
                    "attn/out": 5, "z_up": 6, "a_down": 7}
    # Tied: one row, first use, two applications.
    assert table["embed/embedding"].uses == 2 and table["embed/embedding"].tied
    assert "x2" in table.format(None)
    flow = am.flax.linen_layer_table(LinenTransformer(), TOKENS, depth="dataflow")
    assert {k: v[0] for k, v in layer_depths(flow).items()} == {
        "embed": 0, "ln": 1, "attn/query": 2, "attn/key": 2, "attn/value": 2,
        "attn/out": 3, "z_up": 4, "a_down": 5}
    assert flow["embed/embedding"].uses == 2 and flow["attn/query/kernel"].uses == 1
    # Explicit depths override either.
    custom = am.flax.linen_layer_table(LinenTransformer(), TOKENS, depths={"attn/.*": 2})
    assert custom["attn/key/kernel"].depth == custom["attn/out/bias"].depth == (2,)


@pytest.mark.parametrize("axis,metadata", [(0, True), (0, False), (1, True)])
def test_linen_scan_stack(axis, metadata):
    x = jnp.zeros((2, 4))
    model = linen_stack(axis, metadata)
    table = am.flax.linen_layer_table(model, x)
    for path in ("layers/zlin/kernel", "layers/zlin/bias", "layers/alin/kernel"):
        assert table[path].stack_axis == axis and table[path].num_slices == 3
    assert table["layers/zlin/kernel"].slice_shape == (8, 8)
    assert fans(table, "layers/zlin/kernel") == (8, 8, 64)  # per slice
    assert fans(table, "layers/alin/bias") == (0, 0, 0)  # a 2-D (stacked) bias
    assert layer_depths(table) == {
        "inp": (0,), "layers/zlin": (1, 3, 5), "layers/alin": (2, 4, 6), "head": (7,)}
    assert table["layers/zlin/kernel"].uses == 1  # linen traces the body twice
    flow = am.flax.linen_layer_table(model, x, depth="dataflow")
    assert layer_depths(flow) == layer_depths(table)
    if metadata:  # paths only: the stack axis comes from the Partitioned names
        boxed = am.layer_table(jax.eval_shape(model.init, jax.random.key(0), x))
        assert boxed["layers/zlin/kernel"].stack_axis == axis
        assert boxed["layers/zlin/bias"].stack_axis == axis  # unboxed, same layer
    # Each slice its own depth factor; the same S for the real parameter tree.
    params = model.init(jax.random.key(0), x)["params"]
    s = am.caadam_scales(params, "depth", layers=table)
    got = np.ravel(s["layers"]["alin"]["kernel"])
    np.testing.assert_allclose(got, [s_depth(d, 8) for d in (2, 4, 6)], rtol=1e-12)


def test_linen_lora_fan_fn_and_training_loop():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return LinenLoRADense(3, name="adapted")(nn.relu(nn.Dense(6, name="inp")(x)))

    x = jnp.linspace(-1.0, 1.0, 20).reshape(5, 4)
    table = am.flax.linen_layer_table(Net(), x)
    assert table["adapted/lora_a"].layer == table["adapted/base/kernel"].layer == "adapted/base"
    assert fans(table, "adapted/lora_a") == (6, 2, 12)
    assert table["adapted/lora_b"].depth == (1,)
    counted = am.flax.linen_layer_table(
        Net(), x, fan_fn=lambda p, s: (1, 1) if "lora" in p else None
    )
    assert fans(counted, "adapted/lora_b") == (1, 1, 1)

    # A jitted linen loop with the table: step 1 moves each weight by lr * S.
    net = Net()
    params = net.init(jax.random.key(0), x)["params"]
    lr = 1e-3
    # layers= may also be a callable building the table from the tree it gets
    # (here: paths and shapes, plus the traced order).
    order = [r.layer for r in table.rows]
    tx = am.caadam(lr, "additive", layers=lambda tree: am.layer_table(tree, order=order))

    def loss(p):
        return jnp.mean((net.apply({"params": p}, x) - 1.0) ** 2)

    @jax.jit
    def step(p, state):
        value, g = jax.value_and_grad(loss)(p)
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state, value, g

    state = tx.init(params)
    new, state, first, g = step(params, state)
    # Layers: inp 24 connections; adapted/base 18 + 12 + 6 (kernel, lora_a, lora_b).
    lo, med, hi = 24.0, 30.0, 36.0  # additive: S = 1 + 0.95 * a (docs/caadam.md §3)
    s_inp, s_base = 1 + 0.95 * (med - 24) / (med - lo), 1 - 0.95 * (36 - med) / (hi - med)
    # (lora_b: lora_a's gradient is 0 while lora_b is at its zero init.)
    for path, s in ((("inp", "kernel"), s_inp), (("adapted", "lora_b"), s_base)):
        delta = new[path[0]][path[1]] - params[path[0]][path[1]]
        grad = g[path[0]][path[1]]
        big = np.abs(grad) > 1e-4
        assert big.any()
        np.testing.assert_allclose(np.asarray(delta)[big], -lr * s * np.sign(grad)[big], rtol=1e-3)
    for _ in range(20):
        new, state, value, _ = step(new, state)
    assert value < first


# ---------------------------------------------------------------------------
# nnx models


class NnxNamed(nnx.Module):
    def __init__(self, rngs):
        self.z_first = nnx.Linear(3, 5, rngs=rngs)
        self.a_second = nnx.Linear(5, 7, rngs=rngs)
        self.Dense_10 = nnx.Linear(7, 6, rngs=rngs)
        self.Dense_2 = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.a_second(jax.nn.relu(self.z_first(x))))
        return self.Dense_2(jax.nn.relu(self.Dense_10(x)))


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
        self.bn2 = nnx.BatchNorm(16, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))


class NnxResBlock(nnx.Module):
    def __init__(self, cin, cout, strides, rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=strides, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        self.has_proj = strides != 1 or cin != cout
        if self.has_proj:
            self.proj = nnx.Conv(cin, cout, (1, 1), strides=strides, rngs=rngs)
            self.proj_bn = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x):
        y = self.bn2(self.conv2(jax.nn.relu(self.bn1(self.conv1(x)))))
        if self.has_proj:
            x = self.proj_bn(self.proj(x))
        return jax.nn.relu(x + y)


class NnxResNet20(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.stem_bn = nnx.BatchNorm(16, rngs=rngs)
        blocks, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for block in range(3):
                blocks.append(NnxResBlock(cin, cout, 2 if stage and not block else 1, rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


class NnxTransformer(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
        )
        self.z_up = nnx.Linear(8, 16, rngs=rngs)
        self.a_down = nnx.Linear(16, 8, rngs=rngs)
        self.head = self.embed  # a shared module: the tied output projection

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(self.ln(x))
        x = x + self.a_down(jax.nn.relu(self.z_up(x)))
        return self.head.attend(x)


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.zlin = nnx.Linear(8, 8, rngs=rngs)
        self.alin = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return self.alin(jax.nn.relu(self.zlin(x)))


class NnxStack(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(4, 8, rngs=rngs)

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return NnxBlock(rngs)

        self.blocks = create(rngs)
        self.head = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        x = self.inp(x)

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(block, x):
            return block(x)

        return self.head(body(self.blocks, x))


class NnxLoRA(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.LoRALinear(4, 8, lora_rank=2, rngs=rngs)
        self.base = nnx.Linear(8, 3, rngs=rngs)
        self.adapt = nnx.LoRA(8, 2, 3, base_module=self.base, rngs=rngs)

    def __call__(self, x):
        return self.adapt(jax.nn.relu(self.inp(x)))


# ---------------------------------------------------------------------------
# nnx tests


def test_nnx_user_names_and_training_loop():
    model = NnxNamed(nnx.Rngs(0))
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    table = am.flax.nnx_layer_table(model, x)
    assert {k: v[0] for k, v in layer_depths(table).items()} == {
        "z_first": 0, "a_second": 1, "Dense_10": 2, "Dense_2": 3}
    assert am.layer_table(nnx.state(model, nnx.Param))["Dense_2/kernel"].depth == (0,)
    counts = [15, 35, 42, 12]
    names = ("z_first", "a_second", "Dense_10", "Dense_2")
    assert [fans(table, f"{n}/kernel")[2] for n in names] == counts

    # A jitted nnx loop: nnx.Optimizer(model, caadam(layers=table), wrt=nnx.Param).
    lr = 1e-3
    optimizer = nnx.Optimizer(model, am.caadam(lr, layers=table), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        def loss_fn(model):
            return jnp.mean((model(x) - 1.0) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    before = {n: np.asarray(getattr(model, n).kernel[...]) for n in ("z_first", "Dense_2")}
    first, grads = step(model, optimizer, x)
    for name, c in zip(("z_first", "Dense_2"), (15, 12)):
        delta = np.asarray(getattr(model, name).kernel[...]) - before[name]
        g = np.asarray(grads[name]["kernel"][...])
        big = np.abs(g) > 1e-4
        np.testing.assert_allclose(delta[big], -lr * s_mul(c, counts) * np.sign(g[big]), rtol=1e-3)
    for _ in range(20):
        loss, _ = step(model, optimizer, x)
    assert loss < first


def test_nnx_cnn_with_batchnorm():
    model = nnx.eval_shape(lambda: NnxCNN(nnx.Rngs(0)))
    table = am.flax.nnx_layer_table(model, jax.ShapeDtypeStruct((2, 12, 12, 3), jnp.float32))
    assert [r.path for r in table.rows] == [
        "conv1/kernel", "conv1/bias", "bn1/scale", "bn1/bias",
        "conv2/kernel", "conv2/bias", "bn2/scale", "bn2/bias", "head/kernel", "head/bias"]
    assert [r.depth[0] for r in table.rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert fans(table, "conv2/kernel") == (72, 144, 1152)
    assert fans(table, "bn2/scale") == (0, 0, 0)
    # BatchStat variables are never labelled, even from the whole state.
    assert set(am.layer_table(nnx.state(model))) == set(table)


def test_nnx_resnet20_matches_the_linen_structure():
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    model = nnx.eval_shape(lambda: NnxResNet20(nnx.Rngs(0)))  # abstract: no weights
    table = am.flax.nnx_layer_table(model, x)
    linen = am.flax.linen_layer_table(LinenResNet20(), x)
    assert len(table) == 86
    assert [r.shape for r in table.rows] == [r.shape for r in linen.rows]
    assert [r.depth for r in table.rows] == [r.depth for r in linen.rows]
    units = _caadam_scales.UnitData(table.rows, "reference")
    assert (units.c_min, units.median, units.c_max) == (432, 6912, 36864)
    s = scales(table, "multiplicative", structure="reference")
    np.testing.assert_allclose(float(s["blocks/3/proj/kernel"]), 4.7483, atol=5e-5)
    np.testing.assert_allclose(float(s["blocks/3/proj_bn/scale"]), 5.5663, atol=5e-5)


def test_nnx_transformer_shared_embedding_and_dataflow():
    model = NnxTransformer(nnx.Rngs(0))
    table = am.flax.nnx_layer_table(model, TOKENS)
    emb = table["embed/embedding"]
    assert emb.depth == (0,) and emb.uses == 2 and emb.aliases == ("head/embedding",)
    assert "head/embedding" not in table  # the optimizer sees it once
    assert "x2 =head/embedding" in table.format(None)
    for proj in ("query", "key", "value"):
        assert fans(table, f"attn/{proj}/kernel") == (8, 8, 64)
    assert fans(table, "attn/out/kernel") == (8, 8, 64)
    assert table["attn/query/kernel"].module == "LinearGeneral"
    call = {k: v[0] for k, v in layer_depths(table).items()}
    assert call == {"embed": 0, "ln": 1, "attn/query": 2, "attn/key": 3, "attn/value": 4,
                    "attn/out": 5, "z_up": 6, "a_down": 7}
    flow = am.flax.nnx_layer_table(model, TOKENS, depth="dataflow")
    assert {k: v[0] for k, v in layer_depths(flow).items()} == {
        "embed": 0, "ln": 1, "attn/query": 2, "attn/key": 2, "attn/value": 2,
        "attn/out": 3, "z_up": 4, "a_down": 5}
    assert flow["embed/embedding"].uses == 2
    # Layer structure: counts 88 (embedding once), 4 x 64, 128, 128.
    counts = [88, 64, 64, 64, 64, 128, 128]
    s = scales(flow, "multiplicative")
    np.testing.assert_allclose(s["embed/embedding"], s_mul(88, counts), rtol=1e-12)
    np.testing.assert_allclose(s["a_down/bias"], s_mul(128, counts), rtol=1e-12)


def test_nnx_scan_stack_and_set_adam_per_slice():
    model = NnxStack(nnx.Rngs(0))
    x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    table = am.flax.nnx_layer_table(model, x)
    assert table["blocks/zlin/kernel"].stack_axis == 0
    assert table["blocks/alin/bias"].stack_axis == 0
    assert fans(table, "blocks/zlin/kernel") == (8, 8, 64)
    expected = {"inp": (0,), "blocks/zlin": (1, 3, 5), "blocks/alin": (2, 4, 6), "head": (7,)}
    assert layer_depths(table) == expected
    assert layer_depths(am.flax.nnx_layer_table(model, x, depth="dataflow")) == expected

    # SET-Adam through nnx.Optimizer reduces each slice on its own
    # (docs/set_adam.md §2, step 1, evaluated here in NumPy).
    lr, b1, b2, eps, tau = 1e-3, 0.9, 0.999, 1e-8, 0.5
    optimizer = nnx.Optimizer(model, am.set_adam(lr, layers=table), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return grads

    before = np.asarray(model.blocks.zlin.kernel[...])
    grads = step(model, optimizer, x)
    g = np.asarray(grads["blocks"]["zlin"]["kernel"][...], np.float64)
    delta = np.asarray(model.blocks.zlin.kernel[...]) - before
    for i in range(3):
        m, v = (1 - b1) * g[i], (1 - b2) * g[i] ** 2
        s = v.sum() ** 2 / (v.size * ((v**2).sum() + 1e-20))
        w = np.sqrt(s * v / (1 - b2) + eps)
        ref = -lr * m / ((1 - b1) * (w - tau * w.min()))
        np.testing.assert_allclose(delta[i], ref, rtol=2e-4, atol=1e-9)


def test_nnx_lora_adapters():
    model = NnxLoRA(nnx.Rngs(0))
    x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    table = am.flax.nnx_layer_table(model, x, wrt=nnx.LoRAParam)
    assert list(table) == ["inp/lora/lora_a", "inp/lora/lora_b", "adapt/lora_a", "adapt/lora_b"]
    assert table["inp/lora/lora_b"].layer == "inp"
    assert table["adapt/lora_a"].layer == "adapt/base_module"  # the adapted layer
    assert [fans(table, p) for p in table] == [(4, 2, 8), (2, 8, 16), (8, 2, 16), (2, 3, 6)]
    assert layer_depths(table) == {"inp": (0,), "adapt/base_module": (1,)}
    full = am.flax.nnx_layer_table(model, x)  # all params: base layers included
    assert full["adapt/lora_b"].layer == full["adapt/base_module/kernel"].layer
    assert full["adapt/base_module/kernel"].aliases == ("base/kernel",)

    # Train only the adapters; layers: inp 24, adapt/base_module 22 connections.
    lr = 1e-3
    optimizer = nnx.Optimizer(model, am.caadam(lr, "additive", layers=table), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, x):
        diff = nnx.DiffState(0, nnx.LoRAParam)
        grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2), argnums=diff)(model)
        optimizer.update(model, grads)
        return grads

    base_before = np.asarray(model.base.kernel[...])
    b_before = np.asarray(model.adapt.lora_b[...])
    grads = step(model, optimizer, x)
    np.testing.assert_array_equal(model.base.kernel[...], base_before)
    g = np.asarray(grads["adapt"]["lora_b"][...])  # lora_a's gradient is 0 at b = 0
    delta = np.asarray(model.adapt.lora_b[...]) - b_before
    big = np.abs(g) > 1e-4
    assert big.any()
    s_adapt = 1 + 0.95 * 1.0  # c = c_min = 22 < median 23 -> (23 - 22) / (23 - 22)
    np.testing.assert_allclose(delta[big], -lr * s_adapt * np.sign(g[big]), rtol=1e-3)


def test_bad_depth_policy_raises():
    with pytest.raises(ValueError, match="depth must be one of"):
        am.flax.linen_layer_table(LinenMLP(), jnp.zeros((1, 4)), depth="bfs")


# ---------------------------------------------------------------------------
# einsum layers: fans from the equation


def einsum_fans(equation: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The rule written out for explicit letters: contracted kernel axes make
    fan-in, kernel axes only the kernel brings to the output fan-out; axes in
    input, kernel and output (per-head) neither; connections = weights."""
    ins, out = equation.split("->")
    lhs, ker = ins.split(",")
    fan_in = math.prod(n for c, n in zip(ker, shape) if c in lhs and c not in out)
    fan_out = math.prod(n for c, n in zip(ker, shape) if c in out and c not in lhs)
    return fan_in, fan_out, math.prod(shape)


class LinenEinsums(nn.Module):
    def setup(self):
        self.proj = nn.Einsum((4, 3, 5), "bi,ihj->bhj")
        self.per_head = nn.Einsum((3, 5, 6))  # equation given at the call
        self.vec = nn.Einsum(
            (6,), "bhi,i->bh", use_bias=False, kernel_init=nn.initializers.normal()
        )

    def __call__(self, x):
        y = self.per_head(self.proj(x), "bhi,hio->bho")
        return self.vec(y)


def test_linen_einsum_fans_come_from_the_equation():
    table = am.flax.linen_layer_table(LinenEinsums(), jnp.zeros((2, 4)))
    # 'bi,ihj->bhj', kernel (4, 3, 5): i is contracted, h and j are outputs.
    assert fans(table, "proj/kernel") == (4, 15, 60) == einsum_fans("bi,ihj->bhj", (4, 3, 5))
    # Per-head weights: each of the 3 heads maps 5 -> 6; heads count only in
    # the connections (the number of weights, as for DenseGeneral batch_dims).
    assert fans(table, "per_head/kernel") == (5, 6, 90) == einsum_fans("bhi,hio->bho", (3, 5, 6))
    # A 1-D einsum kernel that contracts is a weight vector (6 -> 1).
    assert fans(table, "vec/kernel") == (6, 1, 6)
    assert fans(table, "proj/bias") == (0, 0, 0)  # (3, 5) bias: no connections
    assert [r.module for r in table.rows if r.leaf_name == "kernel"] == ["Einsum"] * 3
    assert {k: v[0] for k, v in layer_depths(table).items()} == {
        "proj": 0, "per_head": 1, "vec": 2}
    # The multiplicative S uses these counts (60, 90, 6).
    s = scales(table, "multiplicative")
    np.testing.assert_allclose(s["per_head/kernel"], s_mul(90, [60, 90, 6]), rtol=1e-12)


class NnxEinsums(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Einsum("bi,ihj->bhj", (4, 3, 5), (3, 5), rngs=rngs)
        self.per_head = nnx.Einsum("bhi,hio->bho", (3, 5, 6), (3, 6), rngs=rngs)
        self.scale = nnx.Einsum("...hi,hi->...hi", (3, 6), rngs=rngs)  # elementwise
        self.merge = nnx.Einsum("...hi,hio->...o", (3, 6, 2), rngs=rngs)

    def __call__(self, x):
        return self.merge(self.scale(self.per_head(self.proj(x))))


def test_nnx_einsum_fans_come_from_the_equation():
    table = am.flax.nnx_layer_table(NnxEinsums(nnx.Rngs(0)), jnp.zeros((2, 4)))
    assert fans(table, "proj/kernel") == einsum_fans("bi,ihj->bhj", (4, 3, 5)) == (4, 15, 60)
    assert fans(table, "per_head/kernel") == einsum_fans("bhi,hio->bho", (3, 5, 6))
    # Every kernel axis in input and output: an elementwise scale, like a norm's.
    assert fans(table, "scale/kernel") == (0, 0, 0)
    # With '...' in the operands: h and i contracted (18), o out (2).
    assert fans(table, "merge/kernel") == (18, 2, 36)
    # The same in the dataflow policy (fans do not depend on it).
    flow = am.flax.nnx_layer_table(NnxEinsums(nnx.Rngs(0)), jnp.zeros((2, 4)), depth="dataflow")
    assert [fans(flow, p) for p in flow] == [fans(table, p) for p in flow]


# ---------------------------------------------------------------------------
# unused parameters


class LinenWithUnused(nn.Module):
    """Two real layers; a root parameter and a probe layer that do nothing."""

    def setup(self):
        self.unused = self.param("unused", nn.initializers.zeros, (3, 3))
        self.probe = nn.Dense(7)
        self.a = nn.Dense(4)
        self.b = nn.Dense(2)

    def __call__(self, x):
        _ = self.probe(x)  # called, but nothing depends on it
        return self.b(nn.relu(self.a(x)))


class NnxWithUnused(nnx.Module):
    def __init__(self, rngs):
        self.unused = nnx.Param(jnp.zeros((3, 3)))
        self.spare = nnx.Linear(3, 7, rngs=rngs)  # never called
        self.a = nnx.Linear(3, 4, rngs=rngs)
        self.b = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.b(jax.nn.relu(self.a(x)))


def check_unused(table: am.LayerTable, unused: list[str]) -> None:
    # The real layers keep the depths of a model without the unused ones,
    # and the unused ones add no level.
    assert table["a/kernel"].depth == (0,) and table["b/kernel"].depth == (1,)
    assert table.num_depths == 2
    assert {r.layer for r in table.rows if r.used} == {"a", "b"}
    assert [r.path for r in table.rows if not r.used] == unused  # last rows
    for path in unused:
        assert table[path].uses == 0 and table[path].depth == (1,)  # the last level
    lines = [ln.split() for ln in table.format("depth").splitlines()]
    col = lines[0].index("depth")
    shown = {ln[0]: ln[col] for ln in lines[2:]}
    assert [p for p, d in shown.items() if d == "unused"] == unused
    # CaAdam's depth strategy: the real layers' S as without the unused
    # parameters (d_m = 2), and S = 1 for the unused ones.
    s = scales(table, "depth")
    np.testing.assert_allclose(s["a/kernel"], s_depth(0, 2), rtol=1e-12)
    np.testing.assert_allclose(s["b/bias"], s_depth(1, 2), rtol=1e-12)
    for path in unused:
        np.testing.assert_allclose(s[path], 1.0)
    # The connection strategies and the per-variable structure: the used
    # parameters' S as in the table without the unused rows, S = 1 for these.
    used_only = am.LayerTable([r for r in table.rows if r.used])
    for strategy in ("additive", "multiplicative", "depth"):
        for structure in ("layer", "variable"):
            kw = {"structure": structure}
            s, ref = scales(table, strategy, **kw), scales(used_only, strategy, **kw)
            if strategy != "multiplicative":  # (V-shaped: equal for two layers)
                assert s["a/kernel"] != s["b/kernel"]  # the statistics are not trivial
            for path in ref:
                np.testing.assert_allclose(s[path], ref[path], rtol=1e-12, err_msg=path)
            for path in unused:
                np.testing.assert_allclose(s[path], 1.0, err_msg=(strategy, structure))


@pytest.mark.parametrize("depth", ["call", "dataflow"])
def test_linen_unused_parameters_do_not_shift_depths(depth):
    x = jnp.zeros((1, 3))
    table = am.flax.linen_layer_table(LinenWithUnused(), x, depth=depth)
    check_unused(table, ["unused", "probe/kernel", "probe/bias"])
    assert table["a/kernel"].uses == 1 and not table["a/kernel"].tied


@pytest.mark.parametrize("depth", ["call", "dataflow"])
def test_nnx_unused_parameters_do_not_shift_depths(depth):
    x = jnp.zeros((1, 3))
    table = am.flax.nnx_layer_table(NnxWithUnused(nnx.Rngs(0)), x, depth=depth)
    check_unused(table, ["unused", "spare/kernel", "spare/bias"])
