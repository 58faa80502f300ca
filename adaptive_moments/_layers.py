"""Layer tables: which layer each parameter belongs to, its depth and fans.

This is the one place that decides, from paths and shapes only:

* **what is labelled**: every array leaf of the tree, except ``None`` and
  ``optax.MaskedNode`` positions, nnx ``Variable``\\ s that are not trainable
  (``BatchStat``, ``Cache``, ``Intermediate``, RNG state, ``Perturbation``),
  and, when a full linen ``variables`` dict is passed, every collection other
  than ``params`` (see :func:`layer_table`'s ``collection``);
* the **layer** of a parameter: its parent path (``Dense_0/kernel`` belongs to
  ``Dense_0``); LoRA adapters (``lora_a``/``lora_b``) belong to the layer they
  adapt (``x/lora/lora_a`` of ``nnx.LoRALinear`` to ``x``; ``x/lora_a`` next
  to ``x/base_module`` to ``x/base_module``);
* its **fans** and **connection count**: for a >= 2-D weight, the JAX
  convention of ``jax.nn.initializers`` (``fan_in = shape[-2] * receptive
  field``, ``fan_out = shape[-1] * receptive field``) and ``connections =
  number of weights`` (as the CaAdam reference counts them); 1-D and 0-d
  parameters, and leaves named like biases or norm parameters (``bias``,
  ``b``, ``beta``, ``offset``, ``scale``, ``gamma``), have no connections
  whatever their rank, so a scan-stacked bias is not mistaken for a weight;
* the **stack axis** of a scan-stacked leaf (given, or read from linen
  ``Partitioned`` names); each slice along it is a layer of its own, with its
  own depth;
* the **depth** of each layer: the forward order when ``order`` is given,
  otherwise the documented fallback below; ``depths`` overrides it.

Fallback order (no ``order``): layers in *natural* path order (``Dense_2``
before ``Dense_10``, unlike ``jax.tree`` order which is lexicographic). Inside
a layer, weights (``kernel``, ``embedding``, ``scale``) come before ``bias``,
as in Keras' creation order. The fallback is deterministic (the same on every
host) but it is *not* the forward order for user-named layers; the Flax
adapters in :mod:`adaptive_moments.flax` trace the model to get it.

Stacked layers: the layers of one stack (all layers under the shortest path
prefix whose parameters are all stacked with the same length, e.g. the
``nn.scan``-ed module) are laid out slice-major at the place of the first of
them: slice 0 of every layer of the stack, then slice 1, ...

Depth levels are always renumbered densely ``0 .. d_m - 1``.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from adaptive_moments import _paths

FanFn = Callable[[str, tuple[int, ...]], Any]

# Leaf names ranked for the within-layer order (Keras creates kernel, then bias;
# BatchNorm gamma (flax: scale), then beta (flax: bias)).
_LEAF_RANK = {
    "kernel": 0,
    "weight": 0,
    "w": 0,
    "embedding": 0,
    "embeddings": 0,
    "scale": 0,
    "gamma": 0,
    "lora_a": 1,
    "lora_b": 1,
    "bias": 2,
    "b": 2,
    "beta": 2,
    "offset": 2,
}

# Leaves that never carry connections, whatever their rank (a scan-stacked
# bias is 2-D; DenseGeneral's bias is (heads, head_dim)).
NO_CONNECTION_LEAVES = frozenset({"bias", "b", "beta", "offset", "scale", "gamma"})

LORA_LEAVES = frozenset({"lora_a", "lora_b"})

# Top-level keys of a linen ``variables`` dict (flax's own collections).
KNOWN_COLLECTIONS = frozenset(
    {
        "params",
        "batch_stats",
        "cache",
        "intermediates",
        "losses",
        "perturbations",
        "params_axes",
        "spectral_norm",
    }
)

# nnx Variable types that an optimizer never updates.
_NON_PARAM_VARIABLES = frozenset(
    {"BatchStat", "Cache", "Intermediate", "RngState", "RngKey", "RngCount", "Perturbation"}
)


def _natural_key(path: str) -> tuple:
    key = []
    for part in path.split("/"):
        for tok in re.split(r"(\d+)", part):
            if tok == "":
                continue
            key.append((0, int(tok), "") if tok.isdigit() else (1, 0, tok))
        key.append((-1, 0, ""))  # component separator sorts first
    return tuple(key)


def _leaf_rank(path: str) -> tuple:
    name = path.rsplit("/", 1)[-1]
    return (_LEAF_RANK.get(name.lower(), 1), _natural_key(name))


def parent_path(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What the labeler knows about one parameter leaf.

    Attributes:
      path: normalised ``/``-joined parameter path (``"Dense_0/kernel"``).
      layer: the layer it belongs to (``"Dense_0"``).
      shape: the full leaf shape.
      fan_in: fan-in of one slice (0 for parameters without connections).
      fan_out: fan-out of one slice (0 for parameters without connections).
      connections: connection count of one slice (number of weights of a
        >= 2-D parameter; 0 for biases, norm scales and scalars).
      depth: depth of each slice (a tuple of length 1 unless stacked).
      stack_axis: the scan/stack axis, or ``None``.
      module: the module type that owns the parameter (``"Dense"``), or
        ``""`` when the table was built from paths only.
      uses: how many times the layer is applied in one forward pass (2 for
        a tied embedding used by ``Embed.__call__`` and ``Embed.attend``);
        its depth is that of its first use. 0 for a parameter the forward
        pass does not use (the traced outputs do not depend on it, so its
        gradient is zero; see :attr:`used`).
      aliases: other paths under which the same parameter is reachable (an
        nnx module shared by two attributes); the optimizer sees it once.
    """

    path: str
    layer: str
    shape: tuple[int, ...]
    fan_in: int
    fan_out: int
    connections: int
    depth: tuple[int, ...]
    stack_axis: int | None = None
    module: str = ""
    uses: int = 1
    aliases: tuple[str, ...] = ()

    @property
    def num_slices(self) -> int:
        if self.stack_axis is None:
            return 1
        return self.shape[self.stack_axis]

    @property
    def slice_shape(self) -> tuple[int, ...]:
        if self.stack_axis is None:
            return self.shape
        return self.shape[: self.stack_axis] + self.shape[self.stack_axis + 1 :]

    @property
    def leaf_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def tied(self) -> bool:
        """Whether the parameter is used more than once or shared."""
        return self.uses > 1 or bool(self.aliases)

    @property
    def used(self) -> bool:
        """Whether the forward pass uses the parameter (``uses > 0``).

        Only the Flax labelers detect unused parameters. An unused one takes
        no depth level of its own: it sits on the last level of the used
        parameters (S = 1 under the depth strategy), so it shifts no other
        depth; ``format`` shows its depth as ``unused``.
        """
        return self.uses > 0


def _format_depth(depth: tuple[int, ...]) -> str:
    if len(set(depth)) == 1:  # unstacked, or parallel slices (a vmap ensemble)
        return str(depth[0])
    steps = {b - a for a, b in zip(depth, depth[1:])}
    if steps == {1}:
        return f"{depth[0]}..{depth[-1]}"
    if len(depth) <= 4:
        return ",".join(map(str, depth))
    if len(steps) == 1:
        return f"{depth[0]}..{depth[-1]}:{steps.pop()}"
    return f"{depth[0]},{depth[1]},..,{depth[-1]}"


def _in_shard_map() -> bool:
    """Whether we are tracing inside ``shard_map`` (leaves are then shards)."""
    return bool(jax.sharding.get_abstract_mesh().manual_axes)


def _check_row_shape(row: LayerInfo, shape: tuple[int, ...], who: str) -> None:
    if shape == row.shape:
        return
    if (
        len(shape) == len(row.shape)
        and all(n > 0 and full % n == 0 for n, full in zip(shape, row.shape))
        and _in_shard_map()
    ):
        return  # a shard of the row's leaf
    stack = "" if row.stack_axis is None else f", stack axis {row.stack_axis}"
    raise ValueError(
        f"{who}: the layer table's row for {row.path!r} has shape {row.shape}{stack}, "
        f"but the parameter has shape {shape}. The table was built for another "
        "model or configuration; rebuild it from this parameter tree "
        "(am.layer_table(params), am.flax.linen_layer_table / nnx_layer_table), or "
        "pass a callable `layers=` that builds it from the tree it receives."
    )


class LayerTable(Mapping[str, LayerInfo]):
    """An ordered, path-keyed table of :class:`LayerInfo` rows.

    Rows are in forward order (the order that decides depth in the
    ``"reference"`` and ``"variable"`` CaAdam structures). ``print(table)``
    shows one row per parameter; :meth:`format` adds the CaAdam factor S for a
    chosen strategy. Tables are plain host-side data: the same on every host.

    Example:
      >>> import jax.numpy as jnp
      >>> import adaptive_moments as am
      >>> table = am.layer_table({'a': {'kernel': jnp.zeros((3, 4))}})
      >>> table['a/kernel'].connections, len(table), table.num_depths
      (12, 1, 1)
    """

    def __init__(self, rows: Sequence[LayerInfo]):
        self._rows = tuple(rows)
        self._by_path = {r.path: r for r in self._rows}
        if len(self._by_path) != len(self._rows):
            seen: set[str] = set()
            dup = [r.path for r in self._rows if r.path in seen or seen.add(r.path)]
            raise ValueError(f"Duplicate parameter paths in layer table: {dup}")

    # Mapping interface -----------------------------------------------------
    def __getitem__(self, path: str) -> LayerInfo:
        return self._by_path[path]

    def __iter__(self) -> Iterator[str]:
        return (r.path for r in self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerTable) and self._rows == other._rows

    def __hash__(self) -> int:
        return hash(self._rows)

    @property
    def rows(self) -> tuple[LayerInfo, ...]:
        return self._rows

    @property
    def num_depths(self) -> int:
        """Number of depth levels (``d_m`` of CaAdam's depth strategy)."""
        if not self._rows:
            return 0
        return 1 + max(max(r.depth) for r in self._rows)

    def _find(self, path: str) -> LayerInfo | None:
        row = self._by_path.get(path)
        if row is not None:
            return row
        head, _, rest = path.partition("/")
        if head == "params" and rest in self._by_path:
            return self._by_path[rest]
        return self._by_path.get("params/" + path)

    def lookup(self, path: str, who: str, shape: Sequence[int] | None = None) -> LayerInfo:
        """The row of ``path``; a clear ``ValueError`` when it is missing.

        This is the one route from an update's leaf to its row, shared by
        every per-layer transformation (and, through the row's path, by
        CaAdam's factors). A table built from a full linen ``variables`` dict
        labels the ``params`` collection under paths without the ``params/``
        prefix; a path with that prefix is looked up without it (and the other
        way round), so one table serves ``variables`` and
        ``variables['params']``.

        With ``shape`` (the leaf's shape) the row must describe that leaf: a
        table built for another model or configuration would silently change
        the per-layer statistics. Inside ``shard_map`` a leaf is a shard of
        the row's shape: each of its dimensions must divide the row's.

        Example:
          >>> import jax.numpy as jnp
          >>> import adaptive_moments as am
          >>> table = am.layer_table({'params': {'d': {'kernel': jnp.zeros((2, 3))}}})
          >>> table.lookup('params/d/kernel', 'me').path
          'd/kernel'
        """
        row = self._find(path)
        if row is not None:
            if shape is not None:
                _check_row_shape(row, tuple(int(n) for n in shape), who)
            return row
        head = path.partition("/")[0]
        if len(self._rows) == 1 and self._rows[0].path == "" and self._rows[0].shape == ():
            raise ValueError(
                f"{who}: parameter {path!r} is not in the layer table, which was built "
                "from a single scalar. Under optax.inject_hyperparams a callable "
                "`layers=` is taken for a schedule and called with the step count: "
                "declare it static, e.g. optax.inject_hyperparams(am.caadam, "
                "static_args=('layers',))(learning_rate=..., layers=fn)."
            )
        known = ", ".join(list(self._by_path)[:8])
        hint = (
            f" {head!r} is a linen collection that is not trained: pass only "
            "variables['params'] to the optimizer."
            if head in KNOWN_COLLECTIONS and head != "params"
            else ""
        )
        raise ValueError(
            f"{who}: parameter {path!r} is not in the layer table "
            f"(known paths start with: {known}).{hint} Build the table from the "
            "same parameter tree, or pass a callable `layers=` that builds "
            "it from the tree it receives."
        ) from None

    def format(
        self,
        strategy: str | None = "multiplicative",
        *,
        gamma: float | None = None,
        structure: str = "layer",
        signed: bool = False,
    ) -> str:
        """Renders the table as text, with CaAdam's S for ``strategy``.

        Columns: path, layer, module type (when known), depth (a range or a
        list for stacked leaves; ``unused`` for a parameter the forward pass
        does not use), fan-in, fan-out, connections, stack axis
        (``axis (xL)``), ``tied`` (when some parameter is used more than once
        (``x2``) or shared (``=other/path``)) and S.

        Args:
          strategy: ``"additive"``, ``"multiplicative"``, ``"depth"`` or
            ``None`` to leave the S column out.
          gamma: the strategy's gamma (``None``: its reference default).
          structure: CaAdam structure used for S (see
            :func:`adaptive_moments.scale_by_connection_aware`).
          signed: the signed multiplicative variant.

        Returns:
          The table as a multi-line string.

        Example:
          >>> import jax.numpy as jnp
          >>> import adaptive_moments as am
          >>> params = {'hidden': {'kernel': jnp.zeros((8, 32)), 'bias': jnp.zeros(32)},
          ...           'out': {'kernel': jnp.zeros((32, 1)), 'bias': jnp.zeros(1)}}
          >>> print(am.layer_table(params).format('depth'))
          path           layer   depth  fan_in  fan_out  connections  stack  S[depth]
          -------------  ------  -----  ------  -------  -----------  -----  --------
          hidden/kernel  hidden  0      8       32       256          -      1.4142
          hidden/bias    hidden  0      -       -        0            -      1.4142
          out/kernel     out     1      32      1        32           -      1.0000
          out/bias       out     1      -       -        0            -      1.0000
        """
        from adaptive_moments import _scaling  # local: _scaling imports us

        scales = None
        if strategy is not None:
            scales = _scaling.scale_factors(
                self, strategy, gamma, structure=structure, signed=signed
            )
        show_module = any(r.module for r in self._rows)
        show_tied = any(r.tied for r in self._rows)
        header = ["path", "layer"]
        if show_module:
            header.append("module")
        header += ["depth", "fan_in", "fan_out", "connections", "stack"]
        if show_tied:
            header.append("tied")
        if scales is not None:
            header.append(f"S[{strategy}]")
        lines = [header]
        for r in self._rows:
            row = [r.path, r.layer or "(root)"]
            if show_module:
                row.append(r.module or "?")
            row += [
                _format_depth(r.depth) if r.used else "unused",
                str(r.fan_in) if r.connections else "-",
                str(r.fan_out) if r.connections else "-",
                str(r.connections),
                "-" if r.stack_axis is None else f"{r.stack_axis} (x{r.num_slices})",
            ]
            if show_tied:
                tied = []
                if r.uses > 1:
                    tied.append(f"x{r.uses}")
                tied += ["=" + a for a in r.aliases]
                row.append(" ".join(tied) or "-")
            if scales is not None:
                s = np.asarray(scales[r.path], dtype=np.float64).reshape(-1)
                row.append(
                    f"{s[0]:.4f}"
                    if s.size == 1 or np.all(s == s[0])
                    else f"{s.min():.4f}..{s.max():.4f}"
                )
            lines.append(row)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = []
        for k, line in enumerate(lines):
            out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
            if k == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"LayerTable({len(self)} parameters, {self.num_depths} depth levels)"


# ---------------------------------------------------------------------------
# fans


def default_fans(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(fan_in, fan_out, connections)`` of one (unstacked) parameter slice.

    >= 2-D: the ``jax.nn.initializers`` convention (last axis out, second to
    last in, the rest receptive field); connections = number of weights, as in
    the CaAdam reference. 0-d and 1-D parameters have no connections.

    Example:
      >>> default_fans((3, 3, 16, 32))  # a 3x3 conv kernel, HWIO
      (144, 288, 4608)
    """
    if len(shape) < 2:
        return 0, 0, 0
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive, math.prod(shape)


def leaf_fans(path: str, slice_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The path-only rule: :func:`default_fans`, none for bias/norm names."""
    if path.rsplit("/", 1)[-1].lower() in NO_CONNECTION_LEAVES:
        return 0, 0, 0
    return default_fans(slice_shape)


def apply_fan_fn(
    fan_fn: FanFn | None, path: str, slice_shape: tuple[int, ...], fans: tuple[int, int, int]
) -> tuple[int, int, int]:
    """``fan_fn``'s answer (2 or 3 numbers) where it gives one, else ``fans``."""
    if fan_fn is None:
        return fans
    got = fan_fn(path, slice_shape)
    if got is None:
        return fans
    got = tuple(int(v) for v in got)
    if len(got) == 2:
        return got[0], got[1], got[0] * got[1]
    if len(got) == 3:
        return got  # type: ignore[return-value]
    raise ValueError(
        f"fan_fn({path!r}, {slice_shape}) must return None, (fan_in, fan_out) or "
        f"(fan_in, fan_out, connections); got {got}."
    )


# ---------------------------------------------------------------------------
# reading trees


def _type_names(x: Any) -> set[str]:
    return {c.__name__ for c in type(x).__mro__}


def is_variable(x: Any) -> bool:
    """An nnx ``Variable`` (duck-typed: this module does not import flax)."""
    return any(
        c.__name__ == "Variable" and c.__module__.startswith("flax") for c in type(x).__mro__
    )


def is_box(x: Any) -> bool:
    """A linen ``Partitioned``-style metadata box."""
    return (
        not is_variable(x) and hasattr(x, "names") and hasattr(x, "value") and hasattr(x, "unbox")
    )


def _is_leaf(x: Any) -> bool:
    return x is None or is_variable(x) or is_box(x)


def select_collection(tree: Any, collection: str | None) -> Any:
    """The sub-tree to label (``variables['params']`` of a linen dict)."""
    if collection is None or not isinstance(tree, Mapping):
        return tree
    keys = list(tree.keys())
    if collection == "auto":
        if (
            "params" in keys
            and all(isinstance(tree[k], Mapping) for k in keys)
            and all(k in KNOWN_COLLECTIONS for k in keys)
        ):
            return tree["params"]
        return tree
    if collection in keys:
        return tree[collection]
    raise ValueError(
        f"collection={collection!r} is not a top-level key of the tree "
        f"(keys: {keys[:8]})."
    )


def _axis_names(x: Any) -> tuple | None:
    """Partition names of a linen box or an nnx Variable's sharding metadata."""
    names = getattr(x, "names", None) if is_box(x) else None
    if names is None and is_variable(x) and hasattr(x, "get_metadata"):
        meta = x.get_metadata()
        for key in ("out_sharding", "sharding_names", "sharding"):
            if meta.get(key) is not None:
                names = meta[key]
                break
    if names is None:
        return None
    try:
        return tuple(names)
    except TypeError:
        return None


def param_leaves(tree: Any) -> list[tuple[str, tuple[int, ...], tuple | None]]:
    """``(normalised path, shape, partition names)`` of every trainable leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    out = []
    for p, x in flat:
        if x is None:
            continue
        names = _axis_names(x)
        if is_variable(x):
            if _type_names(x) & _NON_PARAM_VARIABLES:
                continue
            x = x.get_value() if hasattr(x, "get_value") else x.value
        elif is_box(x):
            x = x.value
        out.append((_paths.normalize_path(p), _paths.leaf_shape(x), names))
    return out


def names_stack_axis(names: Sequence[Any] | None, stack_names: Sequence[str]) -> int | None:
    """The first axis whose partition name is one of ``stack_names``."""
    for i, n in enumerate(names or ()):
        if n in stack_names or (isinstance(n, tuple) and any(m in stack_names for m in n)):
            return i
    return None


def match(mapping: Mapping[str, Any] | None, path: str, layer: str) -> Any:
    """``mapping``'s value for a parameter: exact path, layer, then regex."""
    if not mapping:
        return None
    if path in mapping:
        return mapping[path]
    if layer in mapping:
        return mapping[layer]
    for pattern, value in mapping.items():
        if re.fullmatch(pattern, path) or re.fullmatch(pattern, layer):
            return value
    return None


def check_axis(path: str, shape: tuple[int, ...], axis: Any) -> int | None:
    if axis is None:
        return None
    axis = int(axis)
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"stack axis {axis} is out of range for {path!r} with shape {shape}.")
    return axis % len(shape)


def lora_layer(path: str, all_paths: set[str]) -> str:
    """The layer a LoRA adapter leaf belongs to (paths only)."""
    parent = parent_path(path)
    if parent == "lora" or parent.endswith("/lora"):  # nnx.LoRALinear: x/lora/lora_a
        return parent_path(parent)
    for base in ("base_module", "base"):  # nnx.LoRA(base_module=...), user LoRA
        prefix = f"{parent}/{base}/" if parent else f"{base}/"
        if any(p.startswith(prefix) for p in all_paths):
            return prefix[:-1]
    return parent


@dataclasses.dataclass
class LeafSpec:
    """One leaf before depths are known (built here or by the Flax adapters)."""

    path: str
    layer: str
    shape: tuple[int, ...]
    fan_in: int
    fan_out: int
    connections: int
    stack_axis: int | None
    module: str = ""

    @property
    def slice_shape(self) -> tuple[int, ...]:
        a = self.stack_axis
        return self.shape if a is None else self.shape[:a] + self.shape[a + 1 :]

    @property
    def num_slices(self) -> int:
        return 1 if self.stack_axis is None else self.shape[self.stack_axis]


def collect_leaves(
    params: Any,
    *,
    stack_axes: Mapping[str, int] | None = None,
    stack_names: Sequence[str] = ("layers",),
    fan_fn: FanFn | None = None,
    collection: str | None = "auto",
) -> list[LeafSpec]:
    """Path-only :class:`LeafSpec` of every trainable leaf of ``params``."""
    leaves = param_leaves(select_collection(params, collection))
    all_paths = {p for p, _, _ in leaves}
    specs = []
    for path, shape, names in leaves:
        name = path.rsplit("/", 1)[-1]
        layer = lora_layer(path, all_paths) if name.lower() in LORA_LEAVES else parent_path(path)
        axis = match(stack_axes, path, layer)
        if axis is None:
            axis = names_stack_axis(names, stack_names)
        specs.append(LeafSpec(path, layer, shape, 0, 0, 0, check_axis(path, shape, axis)))
    propagate_stack_axes(specs)
    for spec in specs:
        fans = leaf_fans(spec.path, spec.slice_shape)
        spec.fan_in, spec.fan_out, spec.connections = apply_fan_fn(
            fan_fn, spec.path, spec.slice_shape, fans
        )
    return specs


# ---------------------------------------------------------------------------
# depths


def _stack_owners(specs: Sequence[LeafSpec]) -> dict[str, str]:
    """Stacked layer -> its stack: the shortest path prefix whose leaves are
    all stacked with the same number of slices."""
    status: dict[str, set] = {}
    for s in specs:
        parts = s.layer.split("/") if s.layer else []
        for k in range(len(parts) + 1):
            status.setdefault("/".join(parts[:k]), set()).add(
                s.num_slices if s.stack_axis is not None else None
            )
    owners = {}
    for s in specs:
        if s.stack_axis is None or s.layer in owners:
            continue
        parts = s.layer.split("/") if s.layer else []
        for k in range(len(parts) + 1):
            prefix = "/".join(parts[:k])
            if status[prefix] == {s.num_slices}:
                owners[s.layer] = prefix
                break
        else:  # a layer mixing stacked and unstacked leaves
            owners[s.layer] = s.layer
    return owners


def propagate_stack_axes(specs: Sequence[LeafSpec]) -> None:
    """A scan stacks every variable of its body: an unstacked leaf of a layer
    with a stacked leaf (axis a, length L) is stacked too when its axis a has
    length L (a boxed kernel next to an unboxed bias). In place."""
    stacks: dict[str, tuple[int, int]] = {}
    for s in specs:
        if s.stack_axis is not None:
            stacks.setdefault(s.layer, (s.stack_axis, s.num_slices))
    for s in specs:
        st = stacks.get(s.layer)
        if s.stack_axis is None and st is not None:
            axis, n = st
            if axis < len(s.shape) and s.shape[axis] == n:
                s.stack_axis = axis


def assemble(
    specs: Sequence[LeafSpec],
    *,
    order: Sequence[str] | None = None,
    levels: Mapping[tuple[str, int | None], int] | None = None,
    depths: Mapping[str, int | Sequence[int]] | None = None,
    uses: Mapping[str, int] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    unused: Collection[str] | None = None,
) -> LayerTable:
    """Puts depths on leaf specs and returns the table in forward order.

    Args:
      specs: the leaves.
      order: parameter or layer paths in forward order (first mention wins);
        layers it does not name follow in fallback (natural path) order.
      levels: dataflow levels per ``(layer, slice)`` (``slice=None``: every
        slice of the layer); overrides ``order`` for depth, not for the order
        of rows that share a depth. Layers without a level go last.
      depths: explicit depth per parameter/layer path or regex (an int, or
        one int per slice).
      uses: applications per layer in one forward pass.
      aliases: other paths of a parameter.
      unused: paths of parameters the forward pass does not use. They get
        ``uses == 0``, take no place in the order or the levels (a layer
        with no used parameter is skipped) and go on the last level of the
        used parameters, after them, unless ``depths`` names them.
    """
    unused = frozenset(unused or ())
    layer_of = {s.path: s.layer for s in specs}
    layer_names = {s.layer for s in specs}
    # Only layers with a used parameter take places in the order or levels.
    used_layers = {s.layer for s in specs if s.path not in unused}
    layer_pos: dict[str, int] = {}
    for name in order or ():
        # Strings are taken as they are: normalize_path would drop a trailing
        # "value", which is also the name of attention's value projection.
        name = name.strip("/") if isinstance(name, str) else _paths.normalize_path(name)
        layer = layer_of.get(name, name if name in layer_names else None)
        if layer is None:
            raise ValueError(
                f"order names {name!r}, which is neither a parameter nor a layer path of this tree."
            )
        layer_pos.setdefault(layer, len(layer_pos))
    for layer in sorted(layer_names - set(layer_pos), key=_natural_key):
        layer_pos[layer] = len(layer_pos)

    num_slices: dict[str, int] = {}
    for s in specs:
        prev = num_slices.get(s.layer)
        if s.stack_axis is not None and prev not in (None, 1, s.num_slices):
            raise ValueError(f"layer {s.layer!r} mixes stacks of different lengths.")
        num_slices[s.layer] = max(prev or 1, s.num_slices)

    if levels is not None:
        # Dataflow levels; used layers without an application (a parameter
        # that reaches the outputs without meeting data) after the deepest.
        unit_depth: dict[tuple[str, int], float] = {}
        top = max(levels.values(), default=0)
        extra = 0
        for layer in sorted(used_layers, key=layer_pos.get):
            for i in range(num_slices[layer]):
                lv = levels.get((layer, i), levels.get((layer, None)))
                if lv is None:
                    extra += 1
                    lv = top + extra
                unit_depth[(layer, i)] = lv
    else:
        owners = _stack_owners(specs)
        ordered = sorted(used_layers, key=layer_pos.get)
        units: list[tuple[str, int]] = []
        placed: set[str] = set()
        for layer in ordered:
            if layer in placed:
                continue
            if layer not in owners:
                units.append((layer, 0))
                placed.add(layer)
                continue
            key = (owners[layer], num_slices[layer])
            group = [
                ly
                for ly in ordered
                if ly in owners and ly not in placed and (owners[ly], num_slices[ly]) == key
            ]
            for i in range(num_slices[layer]):
                units.extend((ly, i) for ly in group)
            placed.update(group)
        unit_depth = {u: k for k, u in enumerate(units)}

    pending: list[tuple[LeafSpec, tuple[float, ...] | None]] = []
    for s in specs:
        n = s.num_slices
        depth: tuple[float, ...] | None = None  # unused: set below
        if s.path in unused:
            pass
        elif s.stack_axis is None and num_slices[s.layer] > 1:
            # An unstacked leaf of a stacked layer is shared by every slice.
            depth = (unit_depth[(s.layer, 0)],)
        else:
            depth = tuple(unit_depth[(s.layer, i)] for i in range(n))
        override = match(depths, s.path, s.layer)
        if override is not None:
            if isinstance(override, (int, np.integer)):
                depth = tuple(int(override) + i for i in range(n))
            else:
                depth = tuple(int(d) for d in override)
                if len(depth) != n:
                    raise ValueError(
                        f"depths for {s.path!r} has {len(depth)} entries; the "
                        f"parameter has {n} slices."
                    )
        pending.append((s, depth))
    # An unused parameter gets zero gradients whatever its S: it goes on the
    # last level already there, so it neither adds a level nor shifts one.
    last = max((d for _, depth in pending if depth is not None for d in depth), default=0)
    rows = []
    for s, depth in pending:
        rows.append(
            LayerInfo(
                s.path,
                s.layer,
                s.shape,
                s.fan_in,
                s.fan_out,
                s.connections,
                (last,) * s.num_slices if depth is None else depth,  # type: ignore[arg-type]
                s.stack_axis,
                s.module,
                0 if s.path in unused else max(1, int((uses or {}).get(s.layer, 1))),
                tuple((aliases or {}).get(s.path, ())),
            )
        )
    # Dense levels 0 .. d_m - 1 (explicit or dataflow depths may leave gaps).
    all_levels = sorted({d for r in rows for d in r.depth})
    dense = {d: k for k, d in enumerate(all_levels)}
    rows = [dataclasses.replace(r, depth=tuple(dense[d] for d in r.depth)) for r in rows]
    rows.sort(key=lambda r: (min(r.depth), not r.used, layer_pos[r.layer], _leaf_rank(r.path)))
    return LayerTable(rows)


def layer_table(
    params: Any,
    *,
    order: Sequence[str] | None = None,
    depths: Mapping[str, int | Sequence[int]] | None = None,
    stack_axes: Mapping[str, int] | None = None,
    stack_names: Sequence[str] = ("layers",),
    fan_fn: FanFn | None = None,
    collection: str | None = "auto",
) -> LayerTable:
    """Builds a :class:`LayerTable` from parameter paths and shapes only.

    Works on any pytree of arrays or ``jax.ShapeDtypeStruct``: linen ``params``
    dicts, nnx ``State`` (``.value`` paths; non-trainable ``BatchStat``,
    ``Cache``, ``Intermediate`` and RNG variables are skipped), boxed
    ``Partitioned`` leaves, plain dicts and lists. ``None`` leaves and
    ``optax.MaskedNode`` positions are skipped. The result depends only on
    the paths and shapes (not on dict insertion order), so every host builds
    the same table. For forward order from a traced call, see
    :func:`adaptive_moments.flax.linen_layer_table` and
    :func:`adaptive_moments.flax.nnx_layer_table`.

    Args:
      params: the parameter tree (only paths and shapes are read).
      order: parameter or layer paths in forward order; it decides the layer
        order, hence depth. Layers it does not name follow in fallback order.
      depths: explicit depth per layer (or parameter) path, or one depth per
        slice for a stacked layer; overrides the order-derived depth. Keys may
        be exact paths or regular expressions. Levels are renumbered densely.
      stack_axes: stack axis per parameter or layer path (or regex) for
        scan-stacked leaves. Linen ``Partitioned`` leaves and nnx Variables
        whose partition names (``nn.scan``/``nnx.vmap`` with
        ``{PARTITION_NAME: 'layers'}``) contain one of ``stack_names`` are
        detected automatically.
      stack_names: partition names that mark a stack axis.
      fan_fn: ``fan_fn(path, slice_shape)`` returning ``(fan_in, fan_out)``
        (connections become their product), ``(fan_in, fan_out,
        connections)``, or ``None`` to keep the default rule.
      collection: for a full linen ``variables`` dict. ``"auto"`` labels only
        ``variables['params']`` when every top-level key is a flax collection
        name (``params``, ``batch_stats``, ``cache``, ``intermediates``, ...),
        so ``{'params': ...}`` alone counts as a variables dict; its paths
        lose the ``params/`` prefix (:meth:`LayerTable.lookup` accepts
        both). A name forces that collection; ``None`` labels the tree as
        given.

    Returns:
      A :class:`LayerTable` in forward order.

    Example:
      >>> import jax.numpy as jnp
      >>> import adaptive_moments as am
      >>> params = {'Dense_10': {'kernel': jnp.zeros((4, 2)), 'bias': jnp.zeros(2)},
      ...           'Dense_2': {'kernel': jnp.zeros((3, 4)), 'bias': jnp.zeros(4)}}
      >>> table = am.layer_table(params)
      >>> [(r.path, r.depth) for r in table.rows]
      [('Dense_2/kernel', (0,)), ('Dense_2/bias', (0,)),
       ('Dense_10/kernel', (1,)), ('Dense_10/bias', (1,))]
      >>> am.layer_table(params, order=['Dense_10', 'Dense_2'])['Dense_2/kernel'].depth
      (1,)
    """
    specs = collect_leaves(
        params,
        stack_axes=stack_axes,
        stack_names=stack_names,
        fan_fn=fan_fn,
        collection=collection,
    )
    return assemble(specs, order=order, depths=depths)


def resolve_table(layers: Any, tree: Any, who: str) -> LayerTable:
    """The table to use for ``tree``: given, built by a callable, or derived."""
    if layers is None:
        return layer_table(tree)
    if isinstance(layers, LayerTable):
        return layers
    if callable(layers):
        table = layers(tree)
        if not isinstance(table, LayerTable):
            raise TypeError(
                f"{who}: the `layers` callable must return a LayerTable, got "
                f"{type(table).__name__}."
            )
        return table
    raise TypeError(
        f"{who}: `layers` must be None, a LayerTable or a callable "
        f"params -> LayerTable; got {type(layers).__name__}."
    )


# ---------------------------------------------------------------------------
# dataflow depth (framework-agnostic; used by the Flax adapters)
#
# Method. Trace ``fn(params, consts, *inputs)`` to a jaxpr and walk it once,
# keeping for every value either "constant", "derived from parameters only"
# (which leaves) or "data" with a level: the number of layer applications on
# the longest chain from the inputs. An equation that combines data with
# parameters of layers L is an application of L at level max(input levels)+1,
# unless it continues an application already open on its data input (same
# layers, parameters not yet consumed by it: the bias add after a matmul, the
# second LoRA factor, LayerNorm's bias after its scale). So parallel branches
# (Q, K, V) get equal levels, and a tied embedding gets one level per use.
# Calls (jit, remat, custom_jvp/vjp) are entered; cond/while bodies are
# walked once; a scan is unrolled when stacked parameters are its xs (slice
# i of every stacked leaf is then layer slice i), and walked once otherwise.


class _Flow:
    def __init__(self, leaf_layer: Sequence[str], stacked: Sequence[bool]):
        self.leaf_layer = leaf_layer
        self.stacked = stacked
        self.apps: dict[tuple[str, int | None], set[int]] = {}

    # infos: None | ("p", tags) | ("d", level, open_layers, consumed_tags)
    def generic(self, ins: Sequence[Any]) -> Any:
        tags = frozenset().union(*(i[1] for i in ins if i is not None and i[0] == "p"))
        datas = [i for i in ins if i is not None and i[0] == "d"]
        if not datas:
            return ("p", tags) if tags else None
        base = max(d[1] for d in datas)
        top = [d for d in datas if d[1] == base]
        open_ = frozenset().union(*(d[2] for d in top))
        consumed = frozenset().union(*(d[3] for d in top))
        if not tags:
            return ("d", base, open_, consumed)
        units = frozenset((self.leaf_layer[i], s) for i, s in tags)
        if units <= open_ and not (tags & consumed):
            return ("d", base, open_, consumed | tags)
        for u in units:
            self.apps.setdefault(u, set()).add(base + 1)
        return ("d", base + 1, units, tags)

    @staticmethod
    def merge(infos: Sequence[Any]) -> Any:
        datas = [i for i in infos if i is not None and i[0] == "d"]
        if datas:
            base = max(d[1] for d in datas)
            top = [d for d in datas if d[1] == base]
            return (
                "d",
                base,
                frozenset().union(*(d[2] for d in top)),
                frozenset().union(*(d[3] for d in top)),
            )
        tags = frozenset().union(*(i[1] for i in infos if i is not None))
        return ("p", tags) if tags else None

    def run(self, jaxpr: Any, ins: Sequence[Any]) -> list[Any]:
        from jax.extend import core as jcore

        if isinstance(jaxpr, jcore.ClosedJaxpr):
            jaxpr = jaxpr.jaxpr
        env: dict[Any, Any] = {}
        for v, info in zip(jaxpr.invars, ins):
            env[v] = info

        def read(v):
            return None if isinstance(v, jcore.Literal) else env.get(v)

        for eqn in jaxpr.eqns:
            args = [read(v) for v in eqn.invars]
            outs = self.equation(eqn, args)
            for v, info in zip(eqn.outvars, outs):
                env[v] = info
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn: Any, args: list[Any]) -> list[Any]:
        from jax.extend import core as jcore

        name = eqn.primitive.name
        p = eqn.params
        n_out = len(eqn.outvars)
        if name == "scan":
            return self.scan(eqn, args)
        if name == "while":
            nc, nb = p["cond_nconsts"], p["body_nconsts"]
            carry = args[nc + nb :]
            outs = self.run(p["body_jaxpr"], args[nc : nc + nb] + carry)
            return [self.merge([a, b]) for a, b in zip(carry, outs)]
        if name == "cond":
            branch_outs = [self.run(b, args[1:]) for b in p["branches"]]
            return [self.merge(list(col)) for col in zip(*branch_outs)]
        for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
            sub = p.get(key)
            if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                inner = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
                if len(inner.invars) == len(args) and len(inner.outvars) == n_out:
                    return self.run(sub, args)
        return [self.generic(args)] * n_out

    def scan(self, eqn: Any, args: list[Any]) -> list[Any]:
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        consts, carry, xs = args[:nc], args[nc : nc + nk], args[nc + nk :]
        unroll = any(
            x is not None and x[0] == "p" and any(s is None and self.stacked[i] for i, s in x[1])
            for x in xs
        )
        steps = range(p["length"]) if unroll else [None]
        if unroll and p.get("reverse"):
            steps = reversed(steps)
        ys_all: list[list[Any]] = []
        for it in steps:
            xs_it = xs
            if it is not None:
                xs_it = [
                    (
                        "p",
                        frozenset(
                            (i, it if s is None and self.stacked[i] else s) for i, s in x[1]
                        ),
                    )
                    if x is not None and x[0] == "p"
                    else x
                    for x in xs
                ]
            outs = self.run(p["jaxpr"], consts + carry + xs_it)
            carry = outs[:nk]
            ys_all.append(outs[nk:])
        ys = [self.merge(list(col)) for col in zip(*ys_all)]
        return carry + ys


def dataflow_levels(
    fn: Callable[..., Any],
    params: Any,
    consts: Any,
    inputs: Sequence[Any],
    layer_of: Mapping[str, str],
    stacked: Mapping[str, bool],
) -> dict[tuple[str, int | None], list[int]]:
    """Application levels (1-based) per ``(layer, slice)`` of ``fn``.

    ``fn(params, consts, *inputs)`` is traced with ``jax.make_jaxpr`` (no
    FLOPs). Leaves of ``params`` whose normalised path is in ``layer_of`` are
    parameters; ``consts`` (batch statistics, RNG state) are constants;
    ``inputs`` (arrays or ``ShapeDtypeStruct``) are the data. ``slice`` is
    ``None`` for an application of the whole leaf.
    """
    closed = jax.make_jaxpr(fn)(params, consts, *inputs)
    flat_params, _ = jax.tree_util.tree_flatten_with_path(params)
    n_params = len(flat_params)
    n_consts = len(jax.tree_util.tree_leaves(consts))
    leaf_layer: list[str] = []
    leaf_stacked: list[bool] = []
    ins: list[Any] = []
    for k, (p, _) in enumerate(flat_params):
        path = _paths.normalize_path(p)
        leaf_layer.append(layer_of.get(path, ""))
        leaf_stacked.append(bool(stacked.get(path, False)))
        ins.append(("p", frozenset({(k, None)})) if path in layer_of else None)
    ins += [None] * n_consts
    n_data = len(closed.jaxpr.invars) - n_params - n_consts
    ins += [("d", 0, frozenset(), frozenset())] * n_data
    flow = _Flow(leaf_layer, leaf_stacked)
    flow.run(closed, ins)
    return {u: sorted(v) for u, v in flow.apps.items()}
