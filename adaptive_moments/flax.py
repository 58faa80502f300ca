"""Layer tables from Flax models: forward order from one abstract call.

:func:`linen_layer_table` and :func:`nnx_layer_table` trace the model once
with ``jax.eval_shape`` (no FLOPs, no parameters materialised) and record
which module methods run, in which order, with which parameter shapes. That
gives what paths and shapes alone cannot:

* **forward order** (``depth="call"``, the default): a layer's depth is the
  position of its first call among the layers (a module that owns parameters
  and has children is placed at the start of its call). User names that sort
  against the forward order (``z_first``, ``a_second``, ``Dense_10`` before
  ``Dense_2``) do not matter.
* **dataflow depth** (``depth="dataflow"``): the model is traced to a jaxpr
  and a layer's depth is the number of layer applications on the longest
  chain from the inputs to its first use, so parallel branches (attention's
  query, key and value) share a depth. A parameter-consuming operation that
  continues an open application of the same layer (the bias add after the
  matmul, LayerNorm's bias after its scale, the second LoRA factor) does not
  count again. ``jit``/``remat``/``custom_jvp`` calls are entered, a
  ``scan`` over stacked parameters is unrolled (one level per slice), other
  loops and ``cond`` branches are walked once. Batched (``vmap``) stacks get
  one level for all slices.
* **module types and their configuration** decide the fans: ``Dense``/
  ``Linear`` ``(in, out)``; ``DenseGeneral``/``LinearGeneral`` by their
  axes (``prod(in axes) x prod(features)``; attention's query/key/value/out
  are such layers); ``Conv`` HWIO (fan-in ``kh*kw*in``, fan-out
  ``kh*kw*out``, connections = the number of kernel weights, as the CaAdam
  reference counts them); ``Embed`` ``(vocab, dim)``; norms and biases have
  no connections; LoRA adapters belong to the layer they adapt. ``fan_fn``
  overrides any of them.
* **stack axes**: from partition names (``metadata_params`` /
  ``transform_metadata`` with ``{PARTITION_NAME: 'layers'}``), else from the
  shapes the module sees inside the scan (or vmap) against the stored
  shapes, else from the rank expected for the module type (a 3-D ``Dense``
  kernel is stacked on axis 0). Each slice is a layer of its own with its
  own depth; slices of one stack are laid out slice-major in call order
  (``nn.vmap`` ensembles too: use ``depth="dataflow"`` or ``depths=`` for
  parallel members).
* **tied and shared parameters**: ``Embed.attend`` after ``Embed.__call__``
  and an nnx module reachable from two attributes are detected. Policy: one
  row per parameter (the optimizer sees it once), at the depth of its
  **first use**; ``LayerInfo.uses`` counts its applications and
  ``LayerInfo.aliases`` lists its other paths (the ``tied`` column).

Only the ``params`` collection (linen) or the ``wrt`` Variables (nnx,
default ``nnx.Param``) are labelled; batch statistics, caches and RNG state
never are.

This module imports flax; ``import adaptive_moments as am`` loads it lazily
as ``am.flax``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from adaptive_moments import _layers

__all__ = ["linen_layer_table", "nnx_layer_table"]

DEPTH_POLICIES = ("call", "dataflow")


# ---------------------------------------------------------------------------
# shared helpers


def _is_arraylike(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _split_args(
    args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[dict[Any, Any], Callable[[dict[Any, Any]], tuple[list[Any], dict[str, Any]]]]:
    """Arguments made of arrays are traced; anything else (flags) is static."""
    dyn: dict[Any, Any] = {}
    static: dict[Any, Any] = {}
    for key, value in [*enumerate(args), *kwargs.items()]:
        leaves = jax.tree_util.tree_leaves(value)
        if leaves and all(_is_arraylike(v) for v in leaves):
            dyn[key] = value
        else:
            static[key] = value

    def rebuild(d: dict[Any, Any]) -> tuple[list[Any], dict[str, Any]]:
        merged = {**static, **d}
        return [merged[i] for i in range(len(args))], {k: merged[k] for k in kwargs}

    return dyn, rebuild


def _check_depth(depth: str) -> None:
    if depth not in DEPTH_POLICIES:
        raise ValueError(f"depth must be one of {DEPTH_POLICIES}; got {depth!r}.")


def _norm_like(type_name: str) -> bool:
    return type_name.endswith("Norm")


def _general_fans(
    shape: tuple[int, ...], n_batch: int, n_out: int
) -> tuple[int, int, int]:
    n_in = len(shape) - n_batch - n_out
    if n_in < 1 or n_out < 1:
        return _layers.default_fans(shape)
    fan_in = math.prod(shape[n_batch : n_batch + n_in])
    fan_out = math.prod(shape[len(shape) - n_out :])
    return fan_in, fan_out, math.prod(shape)


def _as_tuple(x: Any) -> tuple:
    if x is None:
        return ()
    if isinstance(x, (list, tuple)):
        return tuple(x)
    if isinstance(x, Mapping):
        return tuple(x)
    return (x,)


def _module_fans(module: Any, leaf: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Fans of one slice of ``leaf`` owned by ``module``, by module type."""
    name = leaf.lower()
    type_name = type(module).__name__ if module is not None else ""
    if name in _layers.NO_CONNECTION_LEAVES or _norm_like(type_name) or len(shape) < 2:
        return 0, 0, 0
    if name == "kernel" and type_name == "DenseGeneral":  # linen
        return _general_fans(
            shape, len(_as_tuple(module.batch_dims)), len(_as_tuple(module.features))
        )
    if name == "kernel" and type_name == "LinearGeneral":  # nnx
        return _general_fans(
            shape, len(_as_tuple(module.batch_axis)), len(_as_tuple(module.out_features))
        )
    return _layers.default_fans(shape)


def _expected_rank(module: Any, leaf: str) -> int | None:
    """Rank of an unstacked ``leaf`` of ``module`` (for stack detection)."""
    if module is None:
        return None
    type_name = type(module).__name__
    name = leaf.lower()
    if name in _layers.LORA_LEAVES:
        return 2
    if type_name in ("Dense", "Linear", "Embed", "LoRALinear"):
        return 1 if name == "bias" else 2
    if type_name in ("Conv", "ConvTranspose"):
        size = _as_tuple(getattr(module, "kernel_size", ()))
        return 1 if name == "bias" else len(size) + 2
    if _norm_like(type_name) and type_name != "GroupNorm":
        axes = getattr(module, "feature_axes", getattr(module, "reduction_axes", -1))
        return len(_as_tuple(axes)) if type_name == "LayerNorm" else 1
    if type_name == "GroupNorm":
        return 1
    return None


def _stack_axis_from_shapes(outer: tuple[int, ...], inner: tuple[int, ...]) -> int | None:
    if len(outer) != len(inner) + 1:
        return None
    candidates = [i for i in range(len(outer)) if outer[:i] + outer[i + 1 :] == inner]
    if not candidates:
        return None
    return 0 if 0 in candidates else candidates[0]


class _Capture:
    """Call events and the parameter shapes each module sees during a call."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []  # (begin|end, path, method)
        self.modules: dict[str, Any] = {}  # path -> first module object seen
        self.inner: dict[str, tuple[int, ...]] = {}  # param path -> shape seen

    def begin(self, path: str, method: str, module: Any) -> None:
        self.modules.setdefault(path, module)
        self.events.append(("begin", path, method))

    def end(self, path: str, method: str, own: Mapping[str, Any]) -> None:
        for leaf, shape in own.items():
            self.inner.setdefault(f"{path}/{leaf}" if path else leaf, shape)
        self.events.append(("end", path, method))


def _refine(
    specs: list[_layers.LeafSpec],
    modules: Mapping[str, Any],
    inner: Mapping[str, tuple[int, ...]],
    explicit_axes: Mapping[str, int] | None,
    fan_fn: _layers.FanFn | None,
) -> None:
    """Module types, stack axes and fans from what the trace saw (in place)."""
    for s in specs:
        module = modules.get(_layers.parent_path(s.path))
        leaf = s.path.rsplit("/", 1)[-1]
        s.module = type(module).__name__ if module is not None else ""
        explicit = _layers.match(explicit_axes, s.path, s.layer) is not None
        if s.stack_axis is None and not explicit:
            if s.path in inner:
                s.stack_axis = _stack_axis_from_shapes(s.shape, inner[s.path])
            else:
                rank = _expected_rank(module, leaf)
                if rank is not None and len(s.shape) == rank + 1:
                    s.stack_axis = 0
    _layers.propagate_stack_axes(specs)
    for s in specs:
        module = modules.get(_layers.parent_path(s.path))
        leaf = s.path.rsplit("/", 1)[-1]
        fans = _module_fans(module, leaf, s.slice_shape)
        s.fan_in, s.fan_out, s.connections = _layers.apply_fan_fn(
            fan_fn, s.path, s.slice_shape, fans
        )


def _order_and_uses(
    events: Sequence[tuple[str, str, str]], specs: Sequence[_layers.LeafSpec]
) -> tuple[list[str], dict[str, int]]:
    """Layers in order of first call, and their number of applications.

    A call nested in a call that already applies the same layer (the base
    layer inside a LoRA wrapper, ``super().__call__``) is the same
    application. A stacked layer counts each (module, method) once: linen
    traces an ``nn.scan`` body twice.
    """
    owner_layers: dict[str, list[str]] = {}
    stacked = set()
    for s in specs:
        layers = owner_layers.setdefault(_layers.parent_path(s.path), [])
        if s.layer not in layers:
            layers.append(s.layer)
        if s.stack_axis is not None:
            stacked.add(s.layer)
    order: dict[str, None] = {}
    uses: dict[str, int] = {}
    active: list[list[str]] = []
    sites: set[tuple[str, str, str]] = set()
    for kind, path, method in events:
        if kind == "end":
            active.pop()
            continue
        layers = owner_layers.get(path, [])
        outer = {ly for a in active for ly in a}
        for layer in layers:
            order.setdefault(layer, None)
            if layer in outer:
                continue
            if layer in stacked:
                if (layer, path, method) in sites:
                    continue
                sites.add((layer, path, method))
            uses[layer] = uses.get(layer, 0) + 1
        active.append(layers)
    return list(order), uses


def _levels_and_uses(
    apps: Mapping[tuple[str, int | None], list[int]],
) -> tuple[dict[tuple[str, int | None], int], dict[str, int]]:
    levels = {u: min(v) for u, v in apps.items()}
    uses: dict[str, int] = {}
    for (layer, _), v in apps.items():
        uses[layer] = max(uses.get(layer, 0), len(v))
    return levels, uses


# ---------------------------------------------------------------------------
# linen

_SKIPPED_LINEN_METHODS = ("setup",)


def linen_layer_table(
    module: nn.Module,
    *example_args: Any,
    method: str | Callable[..., Any] | None = None,
    rngs: Any = None,
    depth: str = "call",
    depths: Mapping[str, int | Sequence[int]] | None = None,
    stack_axes: Mapping[str, int] | None = None,
    stack_names: Sequence[str] = ("layers",),
    fan_fn: _layers.FanFn | None = None,
    **example_kwargs: Any,
) -> _layers.LayerTable:
    """Layer table of a linen module, in forward order.

    ``module.init`` runs once under ``jax.eval_shape`` with
    ``nn.intercept_methods`` recording every module method call (including
    ``Embed.attend``), so nothing is computed or allocated. Paths are those
    of ``variables['params']``; other collections are not labelled.

    Args:
      module: the (unbound) linen module.
      *example_args: example inputs (arrays or ``jax.ShapeDtypeStruct``);
        non-array arguments (flags) are passed through as static values.
      method: the method to trace (default ``__call__``).
      rngs: a PRNG key or a dict of keys for ``init`` (default: key 0 for the
        ``params`` and ``dropout`` streams).
      depth: ``"call"`` (first-call order) or ``"dataflow"`` (parallel
        branches share a depth); see the module docstring.
      depths: explicit depths per layer/parameter path or regex; override.
      stack_axes: stack axis per layer/parameter path or regex; override.
      stack_names: partition names that mark a stack axis.
      fan_fn: ``fan_fn(path, slice_shape)`` -> ``(fan_in, fan_out[,
        connections])`` or ``None``; overrides the module-type rules.
      **example_kwargs: keyword arguments of the call (``train=False``).

    Returns:
      A :class:`~adaptive_moments.LayerTable`.

    Example:
      >>> import jax.numpy as jnp, flax.linen as nn
      >>> import adaptive_moments as am
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x):
      ...     x = nn.relu(nn.Dense(16, name='z_first')(x))
      ...     return nn.Dense(1, name='a_second')(x)
      >>> table = am.flax.linen_layer_table(Net(), jnp.zeros((1, 8)))
      >>> [(r.path, r.depth[0], r.fan_in, r.fan_out) for r in table.rows]
      [('z_first/kernel', 0, 8, 16), ('z_first/bias', 0, 0, 0),
       ('a_second/kernel', 1, 16, 1), ('a_second/bias', 1, 0, 0)]
    """
    _check_depth(depth)
    if rngs is None:
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    elif not isinstance(rngs, Mapping):
        rngs = {"params": rngs}
    dyn, rebuild = _split_args(example_args, example_kwargs)
    capture = _Capture()

    def interceptor(next_fun, args, kwargs, context):
        name = context.method_name
        if (
            name in _SKIPPED_LINEN_METHODS
            or not name.isidentifier()
            or (name.startswith("_") and name != "__call__")
        ):
            return next_fun(*args, **kwargs)
        mod = context.module
        path = "/".join(str(p) for p in mod.path)
        capture.begin(path, name, mod)
        try:
            return next_fun(*args, **kwargs)
        finally:
            capture.end(path, name, _linen_own_shapes(mod))

    def init_fn(rngs, dyn):
        args, kwargs = rebuild(dyn)
        return module.init(rngs, *args, method=method, **kwargs)

    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(init_fn, rngs, dyn)
    variables = dict(variables)
    params = variables.get("params", {})
    specs = _layers.collect_leaves(
        params, stack_axes=stack_axes, stack_names=stack_names, collection=None
    )
    _refine(specs, capture.modules, capture.inner, stack_axes, fan_fn)
    order, uses = _order_and_uses(capture.events, specs)
    levels = None
    if depth == "dataflow":
        consts = nn.meta.unbox({k: v for k, v in variables.items() if k != "params"})
        apply_rngs = {k: v for k, v in rngs.items() if k != "params"}

        def apply_fn(p, c, d):
            args, kwargs = rebuild(d)
            return module.apply(
                {"params": p, **c}, *args, method=method, rngs=apply_rngs, mutable=True, **kwargs
            )

        apps = _layers.dataflow_levels(
            apply_fn,
            nn.meta.unbox(params),
            consts,
            [dyn],
            {s.path: s.layer for s in specs},
            {s.path: s.stack_axis is not None for s in specs},
        )
        levels, uses = _levels_and_uses(apps)
    return _layers.assemble(specs, order=order, levels=levels, depths=depths, uses=uses)


def _linen_own_shapes(mod: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters a linen module owns directly, as it sees them."""
    try:
        own = mod.variables.get("params", {})
    except Exception:  # an unbound module, or no variables yet
        return {}
    out = {}
    for name, value in own.items():
        if isinstance(value, Mapping):
            continue  # a child module
        if _layers.is_box(value):
            value = value.value
        out[name] = tuple(int(d) for d in np.shape(value))
    return out


# ---------------------------------------------------------------------------
# nnx

_PATH_ATTR = "_adaptive_moments_path"


def _nnx_methods(classes: set[type]) -> list[tuple[type, str, Any, bool]]:
    """Public methods (and ``__call__``) of user/flax module classes to wrap."""
    base = set(nnx.Module.__mro__)
    out = []
    for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__)):
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("_") and name != "__call__":
                continue
            owner = next((c for c in cls.__mro__ if name in c.__dict__), None)
            if owner is None or owner in base:
                continue
            if isinstance(owner.__dict__[name], (staticmethod, classmethod)):
                continue
            out.append((cls, name, fn, name in cls.__dict__))
    return out


def _nnx_own_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, value in vars(module).items():
        if isinstance(value, nnx.Variable):
            out[name] = tuple(int(d) for d in np.shape(value.get_value()))
    return out


def nnx_layer_table(
    model: nnx.Module,
    *example_args: Any,
    method: str = "__call__",
    wrt: Any = nnx.Param,
    depth: str = "call",
    depths: Mapping[str, int | Sequence[int]] | None = None,
    stack_axes: Mapping[str, int] | None = None,
    stack_names: Sequence[str] = ("layers",),
    fan_fn: _layers.FanFn | None = None,
    **example_kwargs: Any,
) -> _layers.LayerTable:
    """Layer table of an nnx model, in forward order.

    A copy of the model is called once under ``jax.eval_shape``; while it
    runs, the public methods and ``__call__`` of every module class in its
    graph are wrapped to record calls (each module copy carries its graph
    path, so calls inside ``nnx.scan``/``nnx.vmap`` are attributed too). The
    model itself is not modified. Paths are those of ``nnx.state(model,
    wrt)`` without the ``.value`` suffix, so the table serves both
    ``tx.init`` (``State`` with ``.value`` paths) and ``tx.update`` (plain
    arrays) inside ``nnx.Optimizer(model, tx, wrt=wrt)``.

    Args:
      model: the nnx model.
      *example_args: example inputs (arrays or ``jax.ShapeDtypeStruct``);
        non-array arguments are passed through as static values.
      method: the method to trace.
      wrt: the Variable filter the optimizer uses (``nnx.Param``;
        ``nnx.LoRAParam`` to train only adapters).
      depth: ``"call"`` (first-call order) or ``"dataflow"``.
      depths: explicit depths per layer/parameter path or regex; override.
      stack_axes: stack axis per layer/parameter path or regex; override.
      stack_names: partition names that mark a stack axis.
      fan_fn: ``fan_fn(path, slice_shape)`` -> ``(fan_in, fan_out[,
        connections])`` or ``None``; overrides the module-type rules.
      **example_kwargs: keyword arguments of the call.

    Returns:
      A :class:`~adaptive_moments.LayerTable`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import adaptive_moments as am
      >>> class Net(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.z_first = nnx.Linear(8, 16, rngs=rngs)
      ...     self.a_second = nnx.Linear(16, 1, rngs=rngs)
      ...   def __call__(self, x):
      ...     return self.a_second(jax.nn.relu(self.z_first(x)))
      >>> table = am.flax.nnx_layer_table(Net(nnx.Rngs(0)), jnp.zeros((1, 8)))
      >>> [(r.path, r.depth[0], r.connections) for r in table.rows]
      [('z_first/kernel', 0, 128), ('z_first/bias', 0, 0),
       ('a_second/kernel', 1, 16), ('a_second/bias', 1, 0)]
    """
    _check_depth(depth)
    dyn, rebuild = _split_args(example_args, example_kwargs)
    clone = nnx.clone(model)
    modules: dict[str, Any] = {}
    for parts, node in nnx.iter_graph(clone):
        if isinstance(node, nnx.Module):
            path = "/".join(str(p) for p in parts)
            setattr(node, _PATH_ATTR, path)
            modules[path] = node

    capture = _Capture()

    def wrap(fn, name):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            path = getattr(self, _PATH_ATTR, None)
            if path is None:
                return fn(self, *args, **kwargs)
            capture.begin(path, name, self)
            try:
                return fn(self, *args, **kwargs)
            finally:
                capture.end(path, name, _nnx_own_shapes(self))

        return wrapper

    patches = _nnx_methods({type(m) for m in modules.values()})
    graphdef, state = nnx.split(clone)

    def run(state, d):
        m = nnx.merge(graphdef, state)
        args, kwargs = rebuild(d)
        return getattr(m, method)(*args, **kwargs)

    try:
        for cls, name, fn, _ in patches:
            setattr(cls, name, wrap(fn, name))
        jax.eval_shape(run, state, dyn)
    finally:
        for cls, name, fn, own in reversed(patches):
            if own:
                setattr(cls, name, fn)
            else:
                delattr(cls, name)

    params = nnx.state(model, wrt)
    specs = _layers.collect_leaves(
        params, stack_axes=stack_axes, stack_names=stack_names, collection=None
    )
    # LoRA adapters with an explicit base module belong to its layer.
    for s in specs:
        owner = modules.get(_layers.parent_path(s.path))
        base = getattr(owner, "base_module", None) if owner is not None else None
        if s.path.rsplit("/", 1)[-1].lower() in _layers.LORA_LEAVES and base is not None:
            s.layer = getattr(base, _PATH_ATTR, s.layer)
    _refine(specs, modules, capture.inner, stack_axes, fan_fn)
    order, uses = _order_and_uses(capture.events, specs)
    aliases = _nnx_aliases(model, [s.path for s in specs])
    levels = None
    if depth == "dataflow":
        graphdef, params_state, rest = nnx.split(clone, wrt, ...)

        def apply_fn(p, c, d):
            m = nnx.merge(graphdef, p, c)
            args, kwargs = rebuild(d)
            return getattr(m, method)(*args, **kwargs)

        apps = _layers.dataflow_levels(
            apply_fn,
            params_state,
            rest,
            [dyn],
            {s.path: s.layer for s in specs},
            {s.path: s.stack_axis is not None for s in specs},
        )
        levels, uses = _levels_and_uses(apps)
    return _layers.assemble(
        specs, order=order, levels=levels, depths=depths, uses=uses, aliases=aliases
    )


def _nnx_aliases(model: nnx.Module, paths: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Other paths of parameters reachable twice (shared modules/Variables)."""
    known = set(paths)
    out: dict[str, list[str]] = {}
    for group in nnx.find_duplicates(model):
        strs = ["/".join(str(p) for p in parts) for parts in group]
        # The canonical path is the one the optimizer's state uses.
        canonical = next(
            (c for c in strs if c in known or any(p.startswith(c + "/") for p in known)), None
        )
        if canonical is None:
            continue
        for p in known:
            if p == canonical or p.startswith(canonical + "/"):
                suffix = p[len(canonical) :]
                out.setdefault(p, []).extend(o + suffix for o in strs if o != canonical)
    return {p: tuple(sorted(set(v))) for p, v in out.items()}
