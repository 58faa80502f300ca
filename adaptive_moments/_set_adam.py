"""SET-Adam: Adam with the range of adaptive stepsizes suppressed per layer."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adaptive_moments import _labeler, _moments, _paths, _table, _validation, _weight_decay

# ---------------------------------------------------------------------------
# Per-layer reductions: the sums and the min of a layer's v.
#
# This is the one place where a "layer" of SET-Adam is reduced. A layer is one
# parameter tensor (docs/set_adam.md §2.1), or one slice along the stack axis
# of a scan-stacked leaf. Three statistics are needed: sum(v), sum(v * v) and
# min(w) where w = sqrt(s * v / bc2 + eps). Since w is a non-decreasing
# function of v (for s >= 0, and IEEE rounding is monotone), min(w) =
# w(min(v)) exactly, so all three reduce the raw v and none depends on
# another: under sharding their all-reduces can be combined (XLA:CPU still
# runs each reduction as its own loop over v; BUILD_NOTES, Performance).
#
# Inside shard_map each device sees only its shard, so with axis_name the
# partial sums are psum-ed and the min pmin-ed over the named mesh axes, and
# the element count is multiplied by the axes' size.

AxisNames = None | str | Sequence[str] | Mapping[str, Any] | Callable[[str], Any]


def axes_for(axis_name: AxisNames, path: str) -> tuple[str, ...]:
    """The mesh axes a leaf's statistics are reduced over inside shard_map."""
    if axis_name is None:
        return ()
    if callable(axis_name) and not isinstance(axis_name, str):
        names = axis_name(path)
    elif isinstance(axis_name, Mapping):
        names = axis_name.get(path)
    else:
        names = axis_name
    if names is None:
        return ()
    if isinstance(names, str):
        return (names,)
    return tuple(names)


def overflow_scale(dtype: Any) -> float:
    """The power of two the statistics fall back to when ``sum(v^2)`` overflows.

    ``2^(-5/8 emax)`` (2^-80 in float32): scaled by it, the largest finite v
    squares to at most 2^(emax/4 * 3) and a layer's sum of ``2^(emax/4)``
    such squares stays finite, while the smallest v that can overflow
    ``sum(v^2)`` (about ``2^(emax/2) / sqrt(d)``) stays far above the
    underflow threshold. A power of two, so scaling is exact.
    """
    return 2.0 ** -(jnp.finfo(dtype).maxexp * 5 // 8)


def layer_statistics(
    v: jax.Array,
    stack_axis: int | None,
    mesh_axes: tuple[str, ...],
    guard: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(s, min v, overflow, d)`` per layer, kept broadcastable against v.

    ``s = (sum v)^2 / (d (sum v^2 + guard)) = cos^2(v, 1)`` is the down-scaling
    factor; ``min v`` the layer minimum; ``overflow`` marks layers whose
    ``sum(v^2)`` is not finite (their ``s`` comes from :func:`scaled_cosine`);
    ``d`` the number of elements of one (global) layer. Reduces over every
    axis but ``stack_axis``; the three reductions are independent of each other.
    """
    axes = tuple(i for i in range(v.ndim) if i != stack_axis)
    s1 = jnp.sum(v, axis=axes, keepdims=True)
    s2 = jnp.sum(v * v, axis=axes, keepdims=True)
    vmin = jnp.min(v, axis=axes, keepdims=True)
    d = 1
    for i in axes:
        d *= v.shape[i]
    if mesh_axes:
        s1, s2 = jax.lax.psum((s1, s2), mesh_axes)
        vmin = jax.lax.pmin(vmin, mesh_axes)
        d = d * jax.lax.psum(1, mesh_axes)
    d = jnp.asarray(d, v.dtype)
    # mean * (sum / sum of squares) rather than sum^2 / d / sum of squares
    # (the reference's order): no intermediate overflows (or underflows for
    # tiny v) before sum(v^2) does, and where sum(v^2) = inf the plain s is
    # 0 rather than inf/inf, so jax.grad through an overflowed layer's update
    # sees no NaN in the branch that `where` discards.
    s = (s1 / d) * (s1 / (s2 + guard))
    return s, vmin, ~jnp.isfinite(s2), d


def scaled_cosine(
    v: jax.Array,
    stack_axis: int | None,
    mesh_axes: tuple[str, ...],
    guard: jax.Array,
    d: jax.Array,
) -> jax.Array:
    """``s`` from the sums of ``c * v`` (``c`` = :func:`overflow_scale`).

    Why: ``v * v`` overflows float32 once v passes ~1.8e19 (|g| ~ 1.3e11 on a
    12-element layer: fp16 loss scaling, loss spikes), and a NaN update then
    makes ``optax.apply_if_finite`` skip every step. ``s`` is scale-invariant,
    so the sums of ``c * v`` (exact scaling: c is a power of two) give it
    without overflow. The update computes them only for a layer that
    overflowed (a ``lax.cond`` per layer): XLA:CPU runs each float reduction
    as its own loop, and two more on every step made SET-Adam 3.2x
    optax.adam's step time instead of 1.3x on the benchmark's 30M tree. The
    plain statistics' all-reduces, on the path always taken, stay combined
    across layers; only the rarely taken branch reduces per layer.
    """
    axes = tuple(i for i in range(v.ndim) if i != stack_axis)
    c = jnp.asarray(overflow_scale(v.dtype), v.dtype)
    # The barrier keeps XLA from rewriting (v c)(v c) as (v v)(c c), which
    # overflows again (inf * 0 = NaN; seen on a one-element shard).
    vc = jax.lax.optimization_barrier(v * c)
    s1c = jnp.sum(vc, axis=axes, keepdims=True)
    s2c = jnp.sum(vc * vc, axis=axes, keepdims=True)
    if mesh_axes:
        s1c, s2c = jax.lax.psum((s1c, s2c), mesh_axes)
    # The guard scales by c^2 too (it underflows to 0: negligible here).
    s_c = (s1c / d) * (s1c / (s2c + guard * c * c))
    # An inf v (|g|^2 overflowed) leaves no meaningful cosine: s = 1, and
    # that element's step is m / inf = 0, as optax.adam's is.
    return jnp.where(jnp.isnan(s_c), 1, s_c).astype(v.dtype)


# ---------------------------------------------------------------------------
# The transformation and its alias.

# Added to sum(v^2) of the raw v in the down-scaling factor; hard-coded in the
# reference code (docs/set_adam.md §2).
COS_GUARD = 1e-20


class ScaleBySetAdamState(NamedTuple):
    """State of :func:`scale_by_set_adam`: raw Adam moments."""

    count: jax.Array  # shape=(), dtype=jnp.int32.
    mu: optax.Updates
    nu: optax.Updates


def scale_by_set_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    tau: jax.typing.ArrayLike = 0.5,
    *,
    layers: _table.LayerTable | Any | None = None,
    axis_name: AxisNames = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates with SET-Adam's per-layer suppressed stepsizes.

    Per layer, the second moment is down-scaled by its squared cosine with the
    all-one vector, epsilon is embedded inside the square root, and the
    denominator is shifted down by ``tau`` times its layer minimum; the
    learning rate and weight decay are left to the chain.
    :func:`~adaptive_moments.set_adam` adds them and gives the formulas.

    Overflow-safe: a layer whose :math:`\sum_i v_i^2` overflows the dtype is
    evaluated in units of an exact power of two, so large gradients give
    finite steps (an element whose :math:`|g|^2` itself overflows steps 0, as
    in ``optax.adam``). Complex parameters are handled as
    ``optax.scale_by_adam`` does (the second moment is the average of
    :math:`|g|^2`). A gradient leaf that is not inexact (integer, bool, or the
    ``float0`` of ``jax.grad(..., allow_int=True)``) gets a zero update, in
    the parameter's dtype when ``params`` are passed, and keeps its moments.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: embedded inside the square root, > 0.
      tau: down-translation fraction, in [0, 1); a one-element layer steps
        :math:`1/(1-\tau)` times as far as Adam.
      layers: a :class:`~adaptive_moments.LayerTable` (or a callable
        ``params -> LayerTable``) whose ``stack_axis`` entries make a stacked
        leaf reduce per slice; ``None`` reduces every leaf as one layer.
      axis_name: inside ``shard_map``, the mesh axis name(s) the layers are
        sharded over (a name, a tuple, a mapping path -> names, or a callable
        path -> names); sums are ``psum``-ed and the min ``pmin``-ed over them.
        Without it, inside ``shard_map`` each device reduces only its own
        shard, with ``d`` its local size: every shard acts as a layer of its
        own, so the update differs from the global-layer one and between
        devices. A leaf that is replicated, or sharded only along its stack
        axis (each device holds whole layers), needs no axis name; naming the
        stack axis would mix different layers. Under plain ``jax.jit`` with
        sharded arrays no ``axis_name`` is needed: XLA inserts the
        all-reduces (combined into one per reduction kind and device group).
      mu_dtype: dtype of the first moment; ``None`` infers it from params.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`; its
      state is a :class:`~adaptive_moments.ScaleBySetAdamState`.

    .. seealso:: :func:`~adaptive_moments.set_adam` (this transformation with
      a learning rate and weight decay, and the maths).
    """
    _validation.check_beta("b1", b1)
    _validation.check_beta("b2", b2)
    _validation.check_positive("eps", eps, "eps = 0 gives 0/0 where v = 0")
    _validation.check_interval("tau", tau, 0.0, 1.0)
    mu_dtype = _moments.canonical_dtype(mu_dtype)
    who = "scale_by_set_adam"

    def init_fn(params):
        _paths.check_not_flattened(params, who)
        mu, nu = _moments.init_moments(params, mu_dtype)
        return ScaleBySetAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _paths.check_not_flattened(updates, who)
        table = _labeler.resolve_table(layers, updates, who) if layers is not None else None
        count = _moments.increment(state.count)
        mu, nu = _moments.update_moments(updates, state.mu, state.nu, b1, b2)
        # Scalars shared by all leaves of a dtype, built once (small traces).
        scalars = _moments.per_dtype(
            lambda cd: (
                1 - _moments.decay_power(b1, count, cd),
                1 - _moments.decay_power(b2, count, cd),
                jnp.asarray(eps, cd),
                jnp.asarray(tau, cd),
                jnp.asarray(COS_GUARD, cd),
            )
        )

        def direction(key_path, g, m, v):
            if g is None or not _moments.is_trained(g):
                return None  # filled by fill_untrained
            if g.size == 0:
                return jnp.zeros_like(g)
            path = _paths.normalize_path(key_path)
            stack_axis = None
            if table is not None:
                stack_axis = table.lookup(path, who, g.shape).stack_axis
            mesh = axes_for(axis_name, path)
            cd = _moments.compute_dtype(g.dtype)
            rd = _moments.real_dtype(cd)
            v = _moments.real_part(_moments.cast(v, cd))
            bc1, bc2, e, tau_cd, guard = scalars(rd)
            s_plain, vmin, overflow, d = layer_statistics(v, stack_axis, mesh, guard)

            # (1) down-scaling: s = cos^2(v, 1), per layer; a layer whose
            # sum(v^2) overflowed takes s from the scaled sums (its own
            # lax.cond: the predicate comes from the reduced sums, so every
            # device of the layer's group takes the same branch) and has its
            # stepsizes computed in units of c (a power of two: exact),
            # rescaled at the end. The plain statistics of all layers have no
            # dependence on each other, so their all-reduces still combine.
            # One cond per layer rather than one for the tree (measured on a
            # quiet machine: no faster, BUILD_NOTES, step time IV), so a layer
            # that stays overflowed for thousands of steps after a spike
            # charges only itself for the extra sums.
            def rescued(v):
                # Per slice of a stacked leaf: only overflowed slices change.
                # The others see v = 1/c, whose scaled sums are finite: their
                # own v would underflow to 0/0, and although `where` discards
                # that value, its NaN derivative would reach jax.grad through
                # the update.
                safe = jnp.where(overflow, v, jnp.asarray(1 / overflow_scale(rd), rd))
                s_c = scaled_cosine(safe, stack_axis, mesh, guard, d)
                return jnp.where(overflow, s_c, s_plain)

            s = jax.lax.cond(jnp.any(overflow), rescued, lambda v: s_plain, v)
            c = jnp.where(overflow, jnp.asarray(overflow_scale(rd), rd), jnp.ones((), rd))
            # 1/sqrt(c) (a power of two) rescales the denominator; folded into
            # the per-layer factor bc1, so the element-wise work is unchanged.
            bc1 = bc1 * jnp.where(overflow, jnp.asarray(overflow_scale(rd) ** -0.5, rd), 1)
            # (2) eps inside the sqrt, after bias correction; s / bc2 is one
            # per-layer factor, so the element-wise work is one multiply-add.
            k = (s / bc2) * c
            e_c = e * c
            w = jnp.sqrt(k * v + e_c)
            # (3) down-translation by tau * min(w) of the layer; an all-inf
            # layer (every |g|^2 overflowed) keeps a finite shift: steps 0.
            vmin = jnp.minimum(vmin, jnp.finfo(rd).max)
            shift = tau_cd * jnp.sqrt(k * vmin + e_c)
            den = _moments.cast(bc1 * (w - shift), cd)
            out = _moments.cast(m, cd) / den
            return _moments.cast(out, g.dtype)

        # Leaves that are not trained get None here; fill_untrained zeros them.
        new_updates = jax.tree.map_with_path(direction, updates, mu, nu, is_leaf=_paths.is_none)
        new_updates = _moments.fill_untrained(new_updates, updates, params)
        mu = optax.tree.cast(mu, mu_dtype)
        return new_updates, ScaleBySetAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def set_adam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    tau: jax.typing.ArrayLike = 0.5,
    *,
    weight_decay: jax.typing.ArrayLike = 0.0,
    decoupled_weight_decay: bool = False,
    weight_decay_mask: Any | None = None,
    layers: _table.LayerTable | Any | None = None,
    axis_name: AxisNames = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SET-Adam: Adam with the range of its adaptive stepsizes suppressed.

    Per layer (one parameter tensor, or one slice of a scan-stacked tensor)
    the second moment is *down-scaled* by its squared cosine with the all-one
    vector, epsilon is embedded inside the square root, and the denominator is
    *down-translated* by a fraction of its layer minimum:

    .. math::

      \begin{align*}
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        s_t &= \frac{(\sum_i v_{t,i})^2}{d\,(\sum_i v_{t,i}^2 + 10^{-20})},
        \quad w_t = \sqrt{s_t v_t/(1-\beta_2^t) + \epsilon},
        \quad \tilde w_t = w_t - \tau \min_i w_{t,i} \\
        u_t &= -\eta_t \frac{m_t}{(1-\beta_1^t)\,\tilde w_t}
      \end{align*}

    A 0-d or one-element parameter has :math:`s \approx 1`, so its step is
    :math:`1/(1-\tau)` times Adam's (twice, by default), as in the reference.

    Args:
      learning_rate: a scalar or an optax schedule.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: embedded inside the square root, > 0.
      tau: down-translation fraction, in [0, 1).
      weight_decay: weight decay strength.
      decoupled_weight_decay: ``False`` (the reference's default): coupled L2,
        ``g + wd * theta`` feeds the moments; ``True``: AdamW-style
        ``theta * (1 - lr * wd)``.
      weight_decay_mask: a tree or callable selecting the decayed parameters.
      layers: a :class:`~adaptive_moments.LayerTable` (or a callable building
        one) whose ``stack_axis`` entries make a stacked leaf reduce per
        slice; ``None`` reduces every leaf as one layer.
      axis_name: inside ``shard_map``, the mesh axis name(s) a layer is
        sharded over; not needed under ``jax.jit`` (details: the
        transformation's docstring).
      mu_dtype: dtype of the first moment; ``None`` infers it from params.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import adaptive_moments as am
      >>> params = jnp.array([1.0, -2.0, 3.0])
      >>> opt = am.set_adam(1e-1)
      >>> state = opt.init(params)
      >>> for _ in range(3):
      ...   grads = jax.grad(lambda p: jnp.sum(p ** 2))(params)
      ...   updates, state = opt.update(grads, state, params)
      ...   params = optax.apply_updates(params, updates)
      ...   print(f'{jnp.sum(params ** 2):.4f}')
      12.0834
      10.3948
      8.9353

    References:
      Zhang, Niwa & Kleijn, `On Suppressing Range of Adaptive Stepsizes of
      Adam to Improve Generalisation Performance
      <https://arxiv.org/abs/2302.01029>`_, 2023.

    .. seealso:: :func:`~adaptive_moments.scale_by_set_adam` (the
      transformation without learning rate and weight decay; every argument
      in full).
    """
    inner = scale_by_set_adam(
        b1, b2, eps, tau, layers=layers, axis_name=axis_name, mu_dtype=mu_dtype
    )
    return _weight_decay.chain_with_decay(
        inner, learning_rate, weight_decay, weight_decay_mask, decoupled=decoupled_weight_decay
    )
