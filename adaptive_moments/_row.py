"""The row of a layer table: what the labeler knows about one parameter leaf.

One class serves both stages of labelling: :mod:`adaptive_moments._labeler`
builds rows without depths (``depth == ()``) from paths, shapes and module
types, and :mod:`adaptive_moments._depth` puts the depths on them. It lives
below the table and CaAdam's S, which both read rows, with :func:`match`,
which finds a user's per-row option (``depths=``, ``stack_axes=``).
"""

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any


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
      depth: depth of each slice (a tuple of length 1 unless stacked); empty
        while the labeler is still building the row.
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


def num_depths(rows: Sequence[LayerInfo]) -> int:
    """Number of depth levels of ``rows`` (levels are dense ``0 .. d_m - 1``)."""
    if not rows:
        return 0
    return 1 + max(max(r.depth) for r in rows)


def match(mapping: Mapping[str, Any] | None, path: str, layer: str) -> Any:
    """``mapping``'s value for a row: exact path, layer, then regex."""
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
