"""Weight decay for the aliases: ``optax.add_decayed_weights`` that tolerates
``params=None`` when the decay is a concrete zero.

``optax.add_decayed_weights`` raises without params even for a zero rate, which
would make ``am.caadam(lr).update(grads, state)`` fail although nothing needs
the params. The wrapper keeps the same state (so ``inject_hyperparams``, which
traces the rate, sees one structure) and only skips the params check.

The decay and the learning-rate scaling see only inexact leaves: the zero
update of an integer, bool or ``float0`` leaf (see ``_moments``) passes them
untouched, so ``optax.apply_updates`` keeps such a leaf exactly (``-lr * 0``
would make it a float, which rounds integers above 2^24 and raises under
strict dtype promotion).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from adaptive_moments import _moments, _paths, _validation


def _inexact_only(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``inner`` applied to the inexact leaves only; other leaves pass through.

    The state is ``inner``'s own; the hidden leaves are ``None`` for ``inner``
    (optax's convention for absent leaves).
    """

    def hide(tree: Any, like: Any) -> Any:
        return jax.tree.map(
            lambda x, u: None if u is None or not _moments.is_trained(u) else x,
            tree,
            like,
            is_leaf=_paths.is_none,
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        visible = hide(updates, updates)
        seen = None if params is None else hide(params, updates)
        new, state = inner.update(visible, state, seen)
        new = jax.tree.map(
            lambda n, u: u if u is None or not _moments.is_trained(u) else n,
            new,
            updates,
            is_leaf=_paths.is_none,
        )
        return new, state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def add_decayed_weights(
    weight_decay: jax.typing.ArrayLike, mask: Any | None = None
) -> optax.GradientTransformationExtraArgs:
    _validation.check_nonnegative("weight_decay", weight_decay)
    inner = optax.add_decayed_weights(weight_decay, mask)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None and _validation.concrete_float(weight_decay) == 0.0:
            return updates, state
        return inner.update(updates, state, params)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def chain_with_decay(
    inner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: jax.typing.ArrayLike,
    mask: Any | None = None,
    *,
    decoupled: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """The aliases' chain: ``inner``, weight decay, then the learning rate.

    ``decoupled=True`` decays after ``inner`` (AdamW style: ``-lr * wd * theta``,
    not touched by what ``inner`` does); ``False`` decays before it (coupled L2:
    ``g + wd * theta`` feeds the moments).
    """
    _validation.check_learning_rate(learning_rate)
    decay = add_decayed_weights(weight_decay, mask)
    decay = _inexact_only(decay)
    steps = (inner, decay) if decoupled else (decay, inner)
    return optax.chain(*steps, _inexact_only(optax.scale_by_learning_rate(learning_rate)))
