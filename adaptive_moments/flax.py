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
as ``am.flax``. It holds the two tracing front ends; the module-type rules
are in ``_flax_rules.py`` and the pipeline shared after the trace in
``_flax_trace.py``.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from adaptive_moments import _flax_trace, _labeler, _options
from adaptive_moments._row import LayerInfo
from adaptive_moments._table import LayerTable

__all__ = ["linen_layer_table", "nnx_layer_table"]

DEPTH_POLICIES = _options.DEPTH_POLICIES

# The arguments both adapters take, documented once.
_SHARED_ARGS = """depth: ``"call"`` (first-call order) or ``"dataflow"`` (parallel
        branches share a depth); see the module docstring.
      depths: explicit depths per layer/parameter path or regex; override.
      stack_axes: stack axis per layer/parameter path or regex; override.
      stack_names: partition names that mark a stack axis.
      fan_fn: ``fan_fn(path, slice_shape)`` -> ``(fan_in, fan_out[,
        connections])`` or ``None``; overrides the module-type rules."""


def _shared_args_doc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Writes :data:`_SHARED_ARGS` in place of ``{shared_args}`` in ``fn``'s docstring."""
    if fn.__doc__:  # None under python -OO
        fn.__doc__ = fn.__doc__.replace("{shared_args}", _SHARED_ARGS)
    return fn


def _check_depth(depth: _options.DepthPolicy) -> None:
    if depth not in DEPTH_POLICIES:
        raise ValueError(f"depth must be one of {DEPTH_POLICIES}; got {depth!r}.")


# ---------------------------------------------------------------------------
# linen

_SKIPPED_LINEN_METHODS = ("setup",)


@_shared_args_doc
def linen_layer_table(
    module: nn.Module,
    *example_args: Any,
    method: str | Callable[..., Any] | None = None,
    rngs: Any = None,
    depth: _options.DepthPolicy = "call",
    depths: Mapping[str, int | Sequence[int]] | None = None,
    stack_axes: Mapping[str, int] | None = None,
    stack_names: Sequence[str] = ("layers",),
    fan_fn: _labeler.FanFn | None = None,
    **example_kwargs: Any,
) -> LayerTable:
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
      {shared_args}
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
    dyn, rebuild = _flax_trace.split_args(example_args, example_kwargs)
    capture = _flax_trace.Capture()

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
        return capture.record(
            path, name, mod, args, kwargs, lambda: next_fun(*args, **kwargs), _linen_own_shapes
        )

    def init_fn(rngs, dyn):
        args, kwargs = rebuild(dyn)
        return module.init(rngs, *args, method=method, **kwargs)

    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(init_fn, rngs, dyn)
    variables = dict(variables)
    params = variables.get("params", {})
    rows = _labeler.collect_leaves(
        params, stack_axes=stack_axes, stack_names=stack_names, collection=None
    )
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

    return _flax_trace.table_from_trace(
        rows,
        capture,
        capture.modules,
        apply_fn=apply_fn,
        outputs_fn=outputs_fn,
        params=nn.meta.unbox(params),
        consts=consts,
        inputs=dyn,
        depth=depth,
        depths=depths,
        stack_axes=stack_axes,
        fan_fn=fan_fn,
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
        if _labeler.is_box(value):
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


@_shared_args_doc
def nnx_layer_table(
    model: nnx.Module,
    *example_args: Any,
    method: str = "__call__",
    wrt: Any = nnx.Param,
    depth: _options.DepthPolicy = "call",
    depths: Mapping[str, int | Sequence[int]] | None = None,
    stack_axes: Mapping[str, int] | None = None,
    stack_names: Sequence[str] = ("layers",),
    fan_fn: _labeler.FanFn | None = None,
    **example_kwargs: Any,
) -> LayerTable:
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
      {shared_args}
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
    dyn, rebuild = _flax_trace.split_args(example_args, example_kwargs)
    clone = nnx.clone(model)
    modules: dict[str, Any] = {}
    for parts, node in nnx.iter_graph(clone):
        if isinstance(node, nnx.Module):
            path = "/".join(str(p) for p in parts)
            setattr(node, _PATH_ATTR, path)
            modules[path] = node

    capture = _flax_trace.Capture()

    def wrap(fn, name):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            path = getattr(self, _PATH_ATTR, None)
            if path is None:
                return fn(self, *args, **kwargs)
            return capture.record(
                path, name, self, args, kwargs, lambda: fn(self, *args, **kwargs), _nnx_own_shapes
            )

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

    rows = _labeler.collect_leaves(
        nnx.state(model, wrt), stack_axes=stack_axes, stack_names=stack_names, collection=None
    )
    rows = [_lora_layer(r, modules) for r in rows]
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

    return _flax_trace.table_from_trace(
        rows,
        capture,
        modules,
        apply_fn=apply_fn,
        outputs_fn=outputs_fn,
        params=params_state,
        consts=rest,
        inputs=dyn,
        depth=depth,
        depths=depths,
        stack_axes=stack_axes,
        fan_fn=fan_fn,
        aliases=_nnx_aliases(model, [r.path for r in rows]),
    )


def _lora_layer(row: LayerInfo, modules: Mapping[str, Any]) -> LayerInfo:
    """LoRA adapters with an explicit base module belong to its layer."""
    owner = modules.get(_labeler.parent_path(row.path))
    base = getattr(owner, "base_module", None) if owner is not None else None
    if row.leaf_name.lower() not in _labeler.LORA_LEAVES or base is None:
        return row
    return dataclasses.replace(row, layer=getattr(base, _PATH_ATTR, row.layer))


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
