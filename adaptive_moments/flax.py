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
  are such layers); ``Einsum`` by its equation (the equation given at the
  call, else the module's ``einsum_str``): fan-in is the product of the
  kernel axes contracted with the input (in input and kernel, not in the
  output: ``'bi,ihj->bhj'`` has fan-in ``i``), fan-out the product of the
  kernel axes only the kernel brings to the output (``h*j``); a kernel
  axis in input, kernel *and* output (per-head weights, ``h`` of
  ``'bhi,hio->bho'``) is a batch of independent maps, so it counts in
  neither fan, only in the connections; ``Conv`` HWIO (fan-in
  ``kh*kw*in``, fan-out ``kh*kw*out``). Connections are the number of
  kernel weights (as the CaAdam reference counts them), which is
  ``fan_in * fan_out`` for ``Dense`` and for an einsum without batch-like
  kernel axes; ``Embed`` ``(vocab, dim)``; norms, biases and an einsum
  kernel with neither contracted nor output axes (an elementwise scale)
  have no connections; LoRA adapters belong to the layer they adapt.
  ``fan_fn`` overrides any of them.
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
* **unused parameters**: the model is also traced to a jaxpr, and a
  parameter that none of the call's outputs depends on (never read, or read
  only into values that are thrown away: it gets zero gradients) is marked
  ``LayerInfo.uses == 0`` (``used`` is ``False``; the table shows its depth
  as ``unused``). It takes no depth level of its own and does not shift the
  others: it is put on the last level of the used parameters (so the depth
  strategy gives it S = 1), in either depth policy, for linen and nnx. A
  layer none of whose parameters is used is left out of the forward order.

Only the ``params`` collection (linen) or the ``wrt`` Variables (nnx,
default ``nnx.Param``) are labelled; batch statistics, caches and RNG state
never are.

This module imports flax; ``import adaptive_moments as am`` loads it lazily
as ``am.flax``.
"""

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from adaptive_moments import _layers, _paths

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


_EINSUM_TYPES = (nn.Einsum, nnx.Einsum)


def _einsum_subscripts(spec: str) -> list[str]:
    """Subscripts of one einsum operand; ``...`` is one token."""
    head, dots, tail = spec.partition("...")
    return [*head, *(["..."] if dots else []), *tail]


def _einsum_fans(equation: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """Fans of the kernel of ``'input,kernel->output'`` (module docstring).

    Contracted kernel axes (in the input, not in the output) make fan-in;
    axes that only the kernel brings to the output make fan-out. Axes in
    input, kernel and output (per-head weights) and kernel-only axes summed
    away are in neither fan: a batch of independent maps, counted only in
    the connections, which are the number of kernel weights, as for
    ``DenseGeneral``'s ``batch_dims``. ``None`` when the equation does not
    describe a kernel of this rank.

    Example:
      >>> _einsum_fans('bi,ihj->bhj', (4, 3, 5))
      (4, 15, 60)
      >>> _einsum_fans('bhi,hio->bho', (2, 4, 3))  # per head: 4 -> 3
      (4, 3, 24)
    """
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    operands = lhs.split(",")
    if not arrow or len(operands) != 2:
        return None
    inputs, outputs = set(_einsum_subscripts(operands[0])), set(_einsum_subscripts(out))
    kernel = _einsum_subscripts(operands[1])
    # '...' spans the kernel axes that the letters do not name.
    n_dots = len(shape) - (len(kernel) - 1) if "..." in kernel else 0
    if n_dots < 0 or ("..." not in kernel and len(kernel) != len(shape)):
        return None
    fan_in = fan_out = 1
    has_in = has_out = False
    axis = 0
    for sub in kernel:
        span = n_dots if sub == "..." else 1
        size = math.prod(shape[axis : axis + span])
        axis += span
        if span and sub in inputs and sub not in outputs:
            fan_in, has_in = fan_in * size, True
        elif span and sub in outputs and sub not in inputs:
            fan_out, has_out = fan_out * size, True
    if not (has_in or has_out):  # an elementwise scale, like a norm's
        return 0, 0, 0
    return fan_in, fan_out, math.prod(shape)


def _module_fans(
    module: Any, leaf: str, shape: tuple[int, ...], equation: str | None = None
) -> tuple[int, int, int]:
    """Fans of one slice of ``leaf`` owned by ``module``, by module type.

    ``equation`` is the einsum equation an ``Einsum`` module was called with
    (``None``: its ``einsum_str``). The rules are listed in the module
    docstring; types without a rule get :func:`_layers.default_fans`.
    """
    name = leaf.lower()
    type_name = type(module).__name__ if module is not None else ""
    if name in _layers.NO_CONNECTION_LEAVES or _norm_like(type_name):
        return 0, 0, 0
    if name == "kernel" and isinstance(module, _EINSUM_TYPES):
        equation = equation or getattr(module, "einsum_str", None)
        fans = _einsum_fans(equation, shape) if isinstance(equation, str) else None
        if fans is not None:
            return fans
    if len(shape) < 2:
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
    if isinstance(module, _EINSUM_TYPES) and name == "kernel":
        return len(_as_tuple(getattr(module, "shape", getattr(module, "kernel_shape", None))))
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


def _einsum_equation(
    module: Any, method: str, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> str | None:
    """The equation an ``Einsum`` call uses: its argument, else the attribute."""
    if method != "__call__" or not isinstance(module, _EINSUM_TYPES):
        return None
    try:
        bound = inspect.signature(type(module).__call__).bind(module, *args, **kwargs)
        equation = bound.arguments.get("einsum_str")
    except TypeError:  # a subclass with another signature
        equation = None
    if equation is None:
        equation = getattr(module, "einsum_str", None)
    return equation if isinstance(equation, str) else None


class _Capture:
    """Call events and the parameter shapes each module sees during a call."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []  # (begin|end, path, method)
        self.modules: dict[str, Any] = {}  # path -> first module object seen
        self.inner: dict[str, tuple[int, ...]] = {}  # param path -> shape seen
        self.equations: dict[str, str] = {}  # Einsum module path -> equation

    def begin(self, path: str, method: str, module: Any, equation: str | None = None) -> None:
        self.modules.setdefault(path, module)
        if equation is not None:
            self.equations.setdefault(path, equation)
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
    equations: Mapping[str, str],
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
        owner = _layers.parent_path(s.path)
        leaf = s.path.rsplit("/", 1)[-1]
        fans = _module_fans(modules.get(owner), leaf, s.slice_shape, equations.get(owner))
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


def _unused_paths(
    fn: Callable[..., Any], params: Any, consts: Any, inputs: Sequence[Any]
) -> set[str]:
    """Paths of the ``params`` leaves that no output of ``fn`` depends on.

    ``fn(params, consts, *inputs)`` is traced to a jaxpr (no FLOPs) and
    dead code is eliminated; a parameter input that survives is used. So a
    parameter that is never read, or only read into values that are thrown
    away, is unused: its gradient is zero.
    """
    from jax.interpreters import partial_eval as pe

    closed = jax.make_jaxpr(fn)(params, consts, *inputs)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    return {_paths.normalize_path(path) for (path, _), kept in zip(flat, used) if not kept}


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
        capture.begin(path, name, mod, _einsum_equation(mod, name, args, kwargs))
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
    _refine(specs, capture.modules, capture.inner, stack_axes, fan_fn, capture.equations)
    order, uses = _order_and_uses(capture.events, specs)
    consts = nn.meta.unbox({k: v for k, v in variables.items() if k != "params"})
    # All of init's streams: linen falls back to "params" for a stream that
    # is not given (dropout), at init and at apply alike.
    apply_rngs = dict(rngs)

    def apply_fn(p, c, d):
        args, kwargs = rebuild(d)
        return module.apply(
            {"params": p, **c}, *args, method=method, rngs=apply_rngs, mutable=True, **kwargs
        )

    def outputs_fn(p, c, d):
        # mutable=True hands the params back too; they are not an output.
        out, mutated = apply_fn(p, c, d)
        return out, {k: v for k, v in mutated.items() if k != "params"}

    unboxed = nn.meta.unbox(params)
    unused = _unused_paths(outputs_fn, unboxed, consts, [dyn])
    levels = None
    if depth == "dataflow":
        apps = _layers.dataflow_levels(
            apply_fn,
            unboxed,
            consts,
            [dyn],
            {s.path: s.layer for s in specs},
            {s.path: s.stack_axis is not None for s in specs},
        )
        levels, uses = _levels_and_uses(apps)
    return _layers.assemble(
        specs, order=order, levels=levels, depths=depths, uses=uses, unused=unused
    )


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
            capture.begin(path, name, self, _einsum_equation(self, name, args, kwargs))
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
    _refine(specs, modules, capture.inner, stack_axes, fan_fn, capture.equations)
    order, uses = _order_and_uses(capture.events, specs)
    aliases = _nnx_aliases(model, [s.path for s in specs])
    graphdef, params_state, rest = nnx.split(clone, wrt, ...)

    def apply_fn(p, c, d):
        m = nnx.merge(graphdef, p, c)
        args, kwargs = rebuild(d)
        return getattr(m, method)(*args, **kwargs)

    def outputs_fn(p, c, d):
        # Updated non-trained state (batch statistics) counts as an output,
        # as linen's mutated collections do.
        m = nnx.merge(graphdef, p, c)
        args, kwargs = rebuild(d)
        return getattr(m, method)(*args, **kwargs), nnx.state(m, nnx.Not(wrt))

    unused = _unused_paths(outputs_fn, params_state, rest, [dyn])
    levels = None
    if depth == "dataflow":
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
        specs,
        order=order,
        levels=levels,
        depths=depths,
        uses=uses,
        aliases=aliases,
        unused=unused,
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
