"""Independent float64 NumPy references for CaAdam, SET-Adam and EXAdam.

Written from the specs (``docs/caadam.md`` §1-§4 and §6, ``docs/set_adam.md`` §2-§3,
``docs/exadam.md`` §2) and from the layer rules documented in the docstrings of
``adaptive_moments/_labeler.py``, ``adaptive_moments/_depth.py`` and
``adaptive_moments/_caadam_scales.py``, *not* from
the package's JAX code: plain loops over an ordered list of ``(path, array)``
pairs, one statement per line of the specs' pseudo-code, host float64 scalars.

Layer information is derived here from paths and shapes only:

* the layer of a parameter is its parent path (``"conv/kernel"`` -> ``"conv"``;
  a top-level leaf belongs to the layer ``""``);
* a slice of a parameter is the whole tensor, or one index along its stack
  axis; its connection count is ``prod(slice_shape)`` when the slice is
  >= 2-D, else 0;
* the list order is the forward order: layers in order of first appearance,
  and the tensors of one layer listed together (kernel before bias, as Keras
  creates them); stacked layers that share their top-level path component and
  slice count are laid out slice-major at the place of the first one.

Learning rates are a float or a callable ``lr(t - 1)`` (an optax schedule is
evaluated at the 0-based step count). Each ``*_run`` returns the parameter
trajectory: ``{path: array of shape (T, *shape)}`` holding the parameters after
every step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Params = Sequence[tuple[str, np.ndarray]]
LearningRate = float | Callable[[int], float]

CAADAM_DEFAULT_GAMMA = {"additive": 0.95, "multiplicative": 5.0, "depth": 1.0}
SET_ADAM_GUARD = 1e-20


# ---------------------------------------------------------------------------
# structure


@dataclasses.dataclass(frozen=True)
class Var:
    """One parameter tensor as the references see it."""

    path: str
    shape: tuple[int, ...]
    stack_axis: int | None = None

    @property
    def layer(self) -> str:
        return self.path.rsplit("/", 1)[0] if "/" in self.path else ""

    @property
    def short_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def num_slices(self) -> int:
        return 1 if self.stack_axis is None else self.shape[self.stack_axis]

    @property
    def slice_shape(self) -> tuple[int, ...]:
        if self.stack_axis is None:
            return self.shape
        return self.shape[: self.stack_axis] + self.shape[self.stack_axis + 1 :]

    @property
    def slice_connections(self) -> int:
        return math.prod(self.slice_shape) if len(self.slice_shape) >= 2 else 0


def make_vars(
    params: Sequence[tuple[str, Any]], stack_axes: Mapping[str, int] | None = None
) -> list[Var]:
    """``Var`` rows for ``(path, array-or-shape)`` pairs in forward order."""
    stack_axes = stack_axes or {}
    out = []
    for path, x in params:
        shape = tuple(x) if isinstance(x, tuple) else tuple(np.shape(x))
        axis = stack_axes.get(path)
        out.append(Var(path, shape, None if axis is None else axis % len(shape)))
    return out


def layer_units(vars_: Sequence[Var]) -> list[tuple[str, int]]:
    """The ``(layer, slice)`` units in depth order (see the module docstring)."""
    layers: list[str] = []
    slices: dict[str, int] = {}
    stacked: set[str] = set()
    for v in vars_:
        if v.layer not in slices:
            layers.append(v.layer)
            slices[v.layer] = 1
        if v.stack_axis is not None:
            stacked.add(v.layer)
            slices[v.layer] = v.num_slices
    units: list[tuple[str, int]] = []
    placed: set[str] = set()
    for layer in layers:
        if layer in placed:
            continue
        if layer not in stacked:
            units.append((layer, 0))
            placed.add(layer)
            continue
        key = (layer.split("/")[0], slices[layer])
        group = [
            ly
            for ly in layers
            if ly in stacked and ly not in placed and (ly.split("/")[0], slices[ly]) == key
        ]
        for i in range(slices[layer]):
            units.extend((ly, i) for ly in group)
        placed.update(group)
    return units


# ---------------------------------------------------------------------------
# CaAdam's S (docs/caadam.md §2-§4, _caadam_scales.py docstring)


@dataclasses.dataclass
class CaStructure:
    """Connection counts and depths per parameter slice, plus the statistics."""

    conn: dict[str, np.ndarray]  # per slice
    depth: dict[str, np.ndarray]  # per slice
    d_m: int
    c_min: float
    median: float
    c_max: float
    safe: bool


def _statistics(counts: Sequence[float]) -> tuple[float, float, float]:
    if not counts:  # no >= 2-D variable: c_min = c_max = median = 1 (docs/caadam.md §2)
        return 1.0, 1.0, 1.0
    arr = np.asarray(counts, np.float64)
    return float(arr.min()), float(np.median(arr)), float(arr.max())


def ca_structure(vars_: Sequence[Var], structure: str) -> CaStructure:
    """Connection counts ``c``, depths ``d``, ``d_m`` and statistics per structure."""
    conn: dict[str, np.ndarray] = {}
    depth: dict[str, np.ndarray] = {}
    if structure == "reference":
        # Keras keys counts by the short name; the last >= 2-D variable wins.
        by_short: dict[str, float] = {}
        counts = []
        for v in vars_:
            if len(v.shape) > 1:
                by_short[v.short_name] = float(math.prod(v.shape))
                counts.append(float(math.prod(v.shape)))
        for k, v in enumerate(vars_):
            conn[v.path] = np.full(v.num_slices, by_short.get(v.short_name, 0.0))
            depth[v.path] = np.full(v.num_slices, float(k))
        d_m = len(vars_)
        safe = False
    elif structure == "variable":
        counts = []
        k = 0
        for v in vars_:
            conn[v.path] = np.full(v.num_slices, float(v.slice_connections))
            depth[v.path] = np.arange(k, k + v.num_slices, dtype=np.float64)
            k += v.num_slices
            if v.slice_connections > 0:
                counts.extend([float(v.slice_connections)] * v.num_slices)
        d_m = k
        safe = True
    elif structure == "layer":
        units = layer_units(vars_)
        unit_index = {u: i for i, u in enumerate(units)}
        unit_conn = {u: 0.0 for u in units}
        for v in vars_:
            for i in range(v.num_slices):
                unit_conn[(v.layer, i)] += v.slice_connections
        for v in vars_:
            conn[v.path] = np.array([unit_conn[(v.layer, i)] for i in range(v.num_slices)])
            depth[v.path] = np.array([float(unit_index[(v.layer, i)]) for i in range(v.num_slices)])
        counts = [c for c in unit_conn.values() if c > 0]
        d_m = len(units)
        safe = True
    else:
        raise ValueError(structure)
    c_min, med, c_max = _statistics(counts)
    return CaStructure(conn, depth, d_m, c_min, med, c_max, safe)


def _ratio(num: float, den: float, safe: bool) -> float:
    """``num / den``; a zero ``den`` is distance 0 when safe, IEEE x/0 otherwise."""
    if den == 0.0:
        if safe:
            return 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.float64(num) / np.float64(0.0))
    return num / den


def _s_connection(c: float, st: CaStructure, strategy: str, gamma: float, signed: bool) -> float:
    if st.c_min == st.c_max:
        return 1.0
    if st.safe and c == 0:  # no connections: S = 1 (layer / variable)
        return 1.0
    if strategy == "additive":
        if c <= st.median:
            return 1.0 + gamma * _ratio(st.median - c, st.median - st.c_min, st.safe)
        return 1.0 - gamma * _ratio(c - st.median, st.c_max - st.median, st.safe)
    if c <= st.median:
        sigma = _ratio(st.median - c, st.median - st.c_min, st.safe)
    else:
        sigma = _ratio(c - st.median, st.c_max - st.median, st.safe)
        if signed:
            sigma = -sigma
    with np.errstate(all="ignore"):
        return float(np.float64(gamma) ** np.float64(sigma))


def caadam_scales(
    vars_: Sequence[Var],
    strategy: str,
    gamma: float | None = None,
    structure: str = "layer",
    signed: bool = False,
) -> dict[str, np.ndarray]:
    """CaAdam's S per parameter: ``path -> array over slices`` (float64)."""
    gamma = CAADAM_DEFAULT_GAMMA[strategy] if gamma is None else float(gamma)
    st = ca_structure(vars_, structure)
    out = {}
    for v in vars_:
        vals = []
        for c, d in zip(st.conn[v.path], st.depth[v.path], strict=True):
            if strategy == "depth":
                vals.append((1.0 + gamma) ** ((st.d_m - (1.0 + d)) / st.d_m))
            else:
                vals.append(_s_connection(float(c), st, strategy, gamma, signed))
        out[v.path] = np.array(vals, np.float64)
    return out


def _per_slice(values: np.ndarray, var: Var) -> np.ndarray:
    """A per-slice vector shaped to broadcast against the parameter."""
    if var.stack_axis is None:
        return np.float64(values[0])
    shape = [1] * len(var.shape)
    shape[var.stack_axis] = var.num_slices
    return values.reshape(shape)


# ---------------------------------------------------------------------------
# optimizers


def _lr_at(learning_rate: LearningRate, t: int) -> float:
    return float(learning_rate(t - 1)) if callable(learning_rate) else float(learning_rate)


def _start(params: Params) -> dict[str, np.ndarray]:
    return {p: np.array(a, np.float64) for p, a in params}


def _steps(grads: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(grads.values())))


def caadam_run(
    params: Params,
    grads: Mapping[str, np.ndarray],
    *,
    learning_rate: LearningRate = 1e-3,
    strategy: str = "multiplicative",
    gamma: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    structure: str = "layer",
    signed: bool = False,
    amsgrad: bool = False,
    eps_mode: str = "optax",
    weight_decay: float = 0.0,
    stack_axes: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """CaAdam (docs/caadam.md §1, §6): ``eps_mode`` ``"optax"`` or ``"keras"``."""
    vars_ = make_vars(params, stack_axes)
    scales = caadam_scales(vars_, strategy, gamma, structure, signed)
    theta = _start(params)
    m = {p: np.zeros_like(a) for p, a in theta.items()}
    v = {p: np.zeros_like(a) for p, a in theta.items()}
    vmax = {p: np.zeros_like(a) for p, a in theta.items()}
    traj: dict[str, list[np.ndarray]] = {p: [] for p in theta}
    for t in range(1, _steps(grads) + 1):
        lr_t = _lr_at(learning_rate, t)
        bc1 = 1.0 - b1**t
        bc2 = 1.0 - b2**t
        for var in vars_:
            p = var.path
            g = np.asarray(grads[p][t - 1], np.float64)
            s = _per_slice(scales[p], var)
            # Base-class weight decay first, scaled by lr but not by S.
            theta[p] = theta[p] - theta[p] * weight_decay * lr_t
            m[p] = b1 * m[p] + (1.0 - b1) * g
            v[p] = b2 * v[p] + (1.0 - b2) * g * g
            if eps_mode == "keras":
                if amsgrad:  # max of the raw v
                    vmax[p] = np.maximum(vmax[p], v[p])
                    v_used = vmax[p]
                else:
                    v_used = v[p]
                alpha = lr_t * math.sqrt(bc2) / bc1 * s
                theta[p] = theta[p] - alpha * m[p] / (np.sqrt(v_used) + eps)
            elif eps_mode == "optax":
                v_hat = v[p] / bc2
                if amsgrad:  # optax.amsgrad: max of the bias-corrected v
                    vmax[p] = np.maximum(vmax[p], v_hat)
                    v_hat = vmax[p]
                theta[p] = theta[p] - lr_t * s * (m[p] / bc1) / (np.sqrt(v_hat) + eps)
            else:
                raise ValueError(eps_mode)
            traj[p].append(theta[p].copy())
    return {p: np.stack(x) for p, x in traj.items()}


def set_adam_scaling(v: np.ndarray, guard: float = SET_ADAM_GUARD) -> float:
    """SET-Adam's down-scaling factor of one layer, as docs/set_adam.md §2 writes it."""
    d = v.size
    mu = v.sum() / d  # projection coefficient of v onto the all-one vector
    return float((mu * v).sum() / ((v * v).sum() + guard))


def set_adam_run(
    params: Params,
    grads: Mapping[str, np.ndarray],
    *,
    learning_rate: LearningRate = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    tau: float = 0.5,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    stack_axes: Mapping[str, int] | None = None,
    guard: float = SET_ADAM_GUARD,
    scalings: dict[str, list[np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """SET-Adam (docs/set_adam.md §2); a stacked leaf is reduced per slice.

    If ``scalings`` is a dict, the down-scaling factors of every step are
    appended to it: ``path -> [array over slices, ...]``.
    """
    vars_ = make_vars(params, stack_axes)
    theta = _start(params)
    m = {p: np.zeros_like(a) for p, a in theta.items()}
    v = {p: np.zeros_like(a) for p, a in theta.items()}
    traj: dict[str, list[np.ndarray]] = {p: [] for p in theta}
    for t in range(1, _steps(grads) + 1):
        lr_t = _lr_at(learning_rate, t)
        bc1 = 1.0 - b1**t
        bc2 = 1.0 - b2**t
        for var in vars_:
            p = var.path
            g = np.asarray(grads[p][t - 1], np.float64)
            if weight_decay != 0.0:
                if decoupled:
                    theta[p] = theta[p] * (1.0 - lr_t * weight_decay)
                else:
                    g = g + weight_decay * theta[p]
            m[p] = b1 * m[p] + (1.0 - b1) * g
            v[p] = b2 * v[p] + (1.0 - b2) * g * g
            if theta[p].size == 0:
                traj[p].append(theta[p].copy())
                continue
            axis = 0 if var.stack_axis is None else var.stack_axis
            v_slices = [v[p]] if var.stack_axis is None else list(np.moveaxis(v[p], axis, 0))
            denoms = []
            s_all = []
            for v_l in v_slices:
                s = set_adam_scaling(v_l, guard)
                v_down = s * v_l  # (1) down-scaling
                w = np.sqrt(v_down / bc2 + eps)  # (2) eps inside the sqrt
                denoms.append(w - tau * w.min())  # (3) down-translation
                s_all.append(s)
            denom = denoms[0] if var.stack_axis is None else np.moveaxis(np.stack(denoms), 0, axis)
            theta[p] = theta[p] - (lr_t / bc1) * m[p] / denom
            if scalings is not None:
                scalings.setdefault(p, []).append(np.array(s_all))
            traj[p].append(theta[p].copy())
    return {p: np.stack(x) for p, x in traj.items()}


def exadam_run(
    params: Params,
    grads: Mapping[str, np.ndarray],
    *,
    learning_rate: LearningRate = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    log_step_size: bool = False,
    weight_decay: float = 0.0,
    decoupled: bool = True,
) -> dict[str, np.ndarray]:
    """EXAdam (docs/exadam.md §2): current algorithm, or paper v1's log step size."""
    theta = _start(params)
    m = {p: np.zeros_like(a) for p, a in theta.items()}
    v = {p: np.zeros_like(a) for p, a in theta.items()}
    traj: dict[str, list[np.ndarray]] = {p: [] for p in theta}
    for t in range(1, _steps(grads) + 1):
        lr_t = _lr_at(learning_rate, t)
        b1t = b1**t
        b2t = b2**t
        bc1 = 1.0 - b1t
        bc2 = 1.0 - b2t
        f_t = math.log(math.sqrt(t + 1) * math.sqrt(2.0)) if log_step_size else 1.0
        for p in theta:
            g = np.asarray(grads[p][t - 1], np.float64)
            if weight_decay != 0.0:
                if decoupled:  # official: before everything, plain lr (no f_t)
                    theta[p] = theta[p] + (-lr_t * weight_decay) * theta[p]
                else:  # coupled L2 feeds m, v and the gradient term
                    g = g + weight_decay * theta[p]
            m[p] = b1 * m[p] + (1.0 - b1) * g
            v[p] = b2 * v[p] + (1.0 - b2) * g * g
            d1 = 1.0 + (v[p] / (v[p] + eps)) * b2t
            d2 = 1.0 + (m[p] ** 2 / (m[p] ** 2 + eps)) * b1t
            m_tilde = (m[p] / bc1) * d1
            v_tilde = (v[p] / bc2) * d2
            g_tilde = (g / bc1) * d1
            theta[p] = theta[p] + (-lr_t * f_t * (m_tilde + g_tilde)) / (np.sqrt(v_tilde) + eps)
            traj[p].append(theta[p].copy())
    return {p: np.stack(x) for p, x in traj.items()}


# ---------------------------------------------------------------------------
# inputs for trajectory tests


def random_gradients(
    shapes: Mapping[str, tuple[int, ...]],
    steps: int,
    seed: int,
    *,
    scales: Mapping[str, float] | None = None,
    zero_fraction: float = 0.05,
    zero_steps: Mapping[str, Callable[[int], bool]] | None = None,
) -> dict[str, np.ndarray]:
    """Fixed random gradients ``path -> (steps, *shape)`` in float64.

    Entries are normal times a per-path scale times a log-normal magnitude,
    with ``zero_fraction`` exact zeros; ``zero_steps[path](t)`` (1-based t)
    makes a whole tensor zero at step t.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for p, shape in shapes.items():
        g = rng.standard_normal((steps, *shape)) * np.exp(
            0.5 * rng.standard_normal((steps, *shape))
        )
        g *= (scales or {}).get(p, 1.0)
        g[rng.random((steps, *shape)) < zero_fraction] = 0.0
        if zero_steps and p in zero_steps:
            for t in range(1, steps + 1):
                if zero_steps[p](t):
                    g[t - 1] = 0.0
        out[p] = g
    return out


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    out: dict[str, Any] = {}
    for path, x in flat.items():
        node = out
        *head, last = path.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = x
    return out


# ---------------------------------------------------------------------------
# JAX runner shared by the numerics tests (the references above never use it)


def jax_trajectories(
    runs: Mapping[str, tuple[Any, Any]],
    params: Mapping[str, np.ndarray],
    grads: Mapping[str, np.ndarray],
) -> dict[str, dict[str, Any]]:
    """Runs several ``(optax transformation, dtype)`` pairs in ONE jitted call.

    Each run is a ``lax.scan`` over the gradient sequence; compiling them
    together costs far less than one compilation each. Call it inside
    ``jax.enable_x64(True)`` for float64 runs.

    Returns:
      ``{name: {"traj": {path: (T, *shape) float64 array}, "update_dtypes":
      [...], "state_dtypes": [...]}}`` where the dtypes are those of the last
      step's updates and of the final optimizer state's float leaves.
    """
    import jax  # local: the references themselves are NumPy only
    import jax.numpy as jnp
    import optax

    from adaptive_moments import normalize_path

    inputs = {
        name: (
            nest({k: jnp.asarray(a, dtype) for k, a in params.items()}),
            nest({k: jnp.asarray(g, dtype) for k, g in grads.items()}),
        )
        for name, (_, dtype) in runs.items()
    }

    @jax.jit
    def run_all(inputs):
        out = {}
        for name, (opt, _) in runs.items():
            p0, g_seq = inputs[name]

            def step(carry, g, opt=opt):
                p, s = carry
                u, s = opt.update(g, s, p)
                p = optax.apply_updates(p, u)
                return (p, s), (p, u)

            (_, state), (traj, upd) = jax.lax.scan(step, (p0, opt.init(p0)), g_seq)
            out[name] = (traj, upd, state)
        return out

    results = {}
    for name, (traj, upd, state) in run_all(inputs).items():
        flat, _ = jax.tree_util.tree_flatten_with_path(traj)
        results[name] = {
            "traj": {normalize_path(p): np.asarray(x, np.float64) for p, x in flat},
            "update_dtypes": [x.dtype for x in jax.tree.leaves(upd)],
            "state_dtypes": [
                x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)
            ],
        }
    return results


def assert_bf16_tracks_f32(run: Mapping[str, Any], twin: Mapping[str, Any], params: Params) -> None:
    """A bf16 run keeps bf16 updates and moments and follows its float32 twin.

    Each step rounds theta to bf16 (<= 2**-9 relative) and the moments too, so
    after `steps` steps the gap stays below steps * 2**-9 * max|theta|; a wrong
    update would be off by about the distance moved.
    """
    import jax.numpy as jnp  # tests only; the reference itself is NumPy

    assert all(dt == jnp.bfloat16 for dt in run["update_dtypes"] + run["state_dtypes"])
    steps = len(next(iter(twin["traj"].values())))
    for k, want in twin["traj"].items():
        moved = np.max(np.abs(want[-1] - params[k]))
        err = np.max(np.abs(run["traj"][k] - want))
        assert err < steps * 2.0**-9 * np.max(np.abs(want)), (k, err)
        assert err < 0.25 * moved, (k, err, moved)
