"""Key-path normalisation: one string per parameter, whatever the tree type.

Optax only ever sees a pytree, and the same parameter reaches a transformation
under different key paths: nnx ``State`` at ``init`` ends its paths in
``.value`` while ``nnx.Optimizer.update`` passes plain arrays, and linen
``Partitioned`` boxes add a ``.value`` too (``docs/ecosystem.md`` §2.4). All layer
metadata in this package is keyed by the normalised ``/``-joined path made here,
never by zipping a pre-built tree with the updates.
"""

import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def normalize_path(path: Sequence[Any] | str) -> str:
    """Returns the ``/``-joined form of a key path, a tuple path or a string.

    A trailing ``value`` attribute (nnx ``Variable``, linen ``Partitioned``) is
    dropped, so the init-time and update-time paths of one parameter agree.

    >>> import jax
    >>> normalize_path((jax.tree_util.DictKey('Dense_0'),
    ...                 jax.tree_util.DictKey('kernel'),
    ...                 jax.tree_util.GetAttrKey('value')))
    'Dense_0/kernel'
    >>> normalize_path(('blocks', 0, 'kernel'))
    'blocks/0/kernel'
    """
    if isinstance(path, str):
        parts = [p for p in path.split("/") if p]
        keys_are_attrs = [False] * len(parts)
    else:
        parts = [_key_str(k) for k in path]
        keys_are_attrs = [isinstance(k, jax.tree_util.GetAttrKey) for k in path]
    # Only an attribute key is a box's `.value`; a string or dict key named
    # "value" is a real name (attention's `value` projection).
    if parts and parts[-1] == "value" and keys_are_attrs[-1]:
        parts = parts[:-1]
    return "/".join(parts)


def is_none(x: Any) -> bool:
    return x is None


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``(normalised path, leaf)`` for every array-like leaf, ``None`` skipped."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
    return [(normalize_path(p), x) for p, x in flat if x is not None]


def leaf_shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(x))


def map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``jax.tree_util.tree_map_with_path`` with normalised string paths.

    ``None`` leaves of ``tree`` stay ``None`` (optax convention, optax#1093).
    """

    def wrapped(path, x, *others):
        if x is None:
            return None
        return fn(normalize_path(path), x, *others)

    return jax.tree_util.tree_map_with_path(wrapped, tree, *rest, is_leaf=is_none)


def check_not_flattened(tree: Any, who: str) -> None:
    """Raises if ``tree`` is the single vector made by ``optax.flatten``.

    ``optax.flatten`` concatenates every parameter into one 1-D array before
    calling the inner transformation, so a per-layer method would silently treat
    the whole model as one layer. A bare array is also what a user passes for a
    one-tensor problem, so the tree alone cannot tell; we look for optax's
    ``flatten`` frames (``optax/transforms/_layouts.py``) on the call stack.
    """
    flat = jax.tree_util.tree_leaves(tree)
    if len(flat) != 1 or jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree)) is False:
        return
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return
        filename = frame.f_code.co_filename.replace("\\", "/")
        if filename.endswith("optax/transforms/_layouts.py") or filename.endswith(
            "optax/_src/transform_layouts.py"
        ):
            raise ValueError(
                f"{who} computes statistics per layer and cannot run under "
                "optax.flatten, which concatenates all parameters into one "
                "vector. Use it without optax.flatten."
            )
        frame = frame.f_back
