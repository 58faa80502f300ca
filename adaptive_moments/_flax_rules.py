"""What a Flax module's type says about its parameters: fans and stack axes.

The module-type rules of :mod:`adaptive_moments.flax` (listed in its
docstring): fans by module type and configuration (``Dense``/``Linear``,
``DenseGeneral``/``LinearGeneral``, ``Einsum`` by its equation, ``Conv``,
norms), the rank an unstacked parameter has (to find stack axes), and
:func:`refine`, which applies them to the labeler's rows once a traced call
has shown each parameter's module.
"""

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
from flax import nnx

from adaptive_moments import _labeler
from adaptive_moments._row import LayerInfo, match


def _norm_like(type_name: str) -> bool:
    return type_name.endswith("Norm")


def _general_fans(shape: tuple[int, ...], n_batch: int, n_out: int) -> tuple[int, int, int]:
    n_in = len(shape) - n_batch - n_out
    if n_in < 1 or n_out < 1:
        return _labeler.default_fans(shape)
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
    """Fans of the kernel of ``'input,kernel->output'`` (``am.flax`` docstring).

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


def module_fans(
    module: Any, leaf: str, shape: tuple[int, ...], equation: str | None = None
) -> tuple[int, int, int]:
    """Fans of one slice of ``leaf`` owned by ``module``, by module type.

    ``equation`` is the einsum equation an ``Einsum`` module was called with
    (``None``: its ``einsum_str``). The rules are listed in the ``am.flax``
    docstring; types without a rule get :func:`_labeler.default_fans`.
    """
    name = leaf.lower()
    type_name = type(module).__name__ if module is not None else ""
    if name in _labeler.NO_CONNECTION_LEAVES or _norm_like(type_name):
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
    return _labeler.default_fans(shape)


def expected_rank(module: Any, leaf: str) -> int | None:
    """Rank of an unstacked ``leaf`` of ``module`` (for stack detection)."""
    if module is None:
        return None
    type_name = type(module).__name__
    name = leaf.lower()
    if name in _labeler.LORA_LEAVES:
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


def einsum_equation(
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


def refine(
    rows: Sequence[LayerInfo],
    modules: Mapping[str, Any],
    inner: Mapping[str, tuple[int, ...]],
    explicit_axes: Mapping[str, int] | None,
    fan_fn: _labeler.FanFn | None,
    equations: Mapping[str, str],
) -> list[LayerInfo]:
    """Module types, stack axes and fans from what the trace saw.

    Args:
      rows: the labeler's path-only rows.
      modules: module object per module path.
      inner: the shape each parameter had inside its module's call (a slice
        of a stacked leaf inside ``scan``/``vmap``).
      explicit_axes: the user's ``stack_axes`` (those rows keep their axis).
      fan_fn: the user's fan rule, which overrides the module-type rules.
      equations: the equation each ``Einsum`` module was called with.

    Returns:
      The rows with ``module``, ``stack_axis`` and fans filled in.
    """
    typed = []
    for r in rows:
        module = modules.get(_labeler.parent_path(r.path))
        stack_axis = r.stack_axis
        if stack_axis is None and match(explicit_axes, r.path, r.layer) is None:
            if r.path in inner:
                stack_axis = _stack_axis_from_shapes(r.shape, inner[r.path])
            else:
                rank = expected_rank(module, r.leaf_name)
                if rank is not None and len(r.shape) == rank + 1:
                    stack_axis = 0
        module_type = type(module).__name__ if module is not None else ""
        typed.append(dataclasses.replace(r, module=module_type, stack_axis=stack_axis))
    out = []
    for r in _labeler.propagate_stack_axes(typed):
        owner = _labeler.parent_path(r.path)
        fans = module_fans(modules.get(owner), r.leaf_name, r.slice_shape, equations.get(owner))
        out.append(_labeler.with_fans(r, fans, fan_fn))
    return out
