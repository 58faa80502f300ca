"""The layer table: rows in forward order, the route from a leaf to its row.

:class:`LayerTable` is plain host-side data (the same on every host): the
rows (:class:`~adaptive_moments.LayerInfo`) in forward order, keyed by
path. :meth:`LayerTable.lookup` is the one route from an update's leaf to
its row (both spellings of a linen ``variables`` path, shape checked), and
:meth:`LayerTable.format` is its text renderer, with CaAdam's S from
:mod:`adaptive_moments._caadam_scales`.
"""

from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np

from adaptive_moments import _caadam_scales, _options
from adaptive_moments._row import LayerInfo, num_depths

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
        return num_depths(self._rows)

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
        strategy: _options.Strategy | None = "multiplicative",
        *,
        gamma: float | None = None,
        structure: _options.Structure = "layer",
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
        scales = None
        if strategy is not None:
            scales = _caadam_scales.LeafScales(
                self._rows, self.lookup, strategy, gamma, structure=structure, signed=signed
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
                # A scalar when every slice has the same S, else the range.
                s = np.asarray(scales.for_leaf(r.path, r.shape, "LayerTable.format"), np.float64)
                row.append(f"{s:.4f}" if s.ndim == 0 else f"{s.min():.4f}..{s.max():.4f}")
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
