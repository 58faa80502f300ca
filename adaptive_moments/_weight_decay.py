"""Weight decay for the aliases: ``optax.add_decayed_weights`` that tolerates
``params=None`` when the decay is a concrete zero.

``optax.add_decayed_weights`` raises without params even for a zero rate, which
would make ``am.caadam(lr).update(grads, state)`` fail although nothing needs
the params. The wrapper keeps the same state (so ``inject_hyperparams``, which
traces the rate, sees one structure) and only skips the params check.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from adaptive_moments import _validation


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
    decay = add_decayed_weights(weight_decay, mask)
    steps = (inner, decay) if decoupled else (decay, inner)
    return optax.chain(*steps, optax.scale_by_learning_rate(learning_rate))
