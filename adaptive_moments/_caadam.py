"""CaAdam: Adam with a connection-aware learning-rate factor per layer."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaptive_moments import (
    _caadam_scales,
    _labeler,
    _moments,
    _options,
    _paths,
    _table,
    _validation,
    _weight_decay,
)


class ScaleByConnectionAwareState(NamedTuple):
    """State of :func:`scale_by_connection_aware`."""

    count: jax.Array  # shape=(), dtype=jnp.int32.
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates | tuple[()]  # () unless amsgrad=True.


def scale_by_connection_aware(
    strategy: _options.Strategy = "multiplicative",
    gamma: jax.typing.ArrayLike | None = None,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    layers: _table.LayerTable | Any | None = None,
    structure: _options.Structure = "layer",
    signed: bool = False,
    amsgrad: bool = False,
    eps_placement: _options.EpsPlacement = "optax",
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates with Adam times CaAdam's per-layer factor S.

    Each parameter's Adam direction
    :math:`\hat m_t / (\sqrt{\hat v_t} + \epsilon)` is multiplied by the
    constant :math:`S` of its unit (a layer or a tensor, see ``structure``),
    computed once on the host from the layer table (S multiplies the finished
    direction, not :math:`m`, so it cannot overflow near the top of the float
    range). The learning rate and weight decay are left to the chain;
    :func:`~adaptive_moments.caadam` adds them and gives the formulas.

    Complex parameters are handled as ``optax.scale_by_adam`` does (the second
    moment is the average of :math:`|g|^2`). A gradient leaf that is not
    inexact (integer, bool, or the ``float0`` of ``jax.grad(...,
    allow_int=True)``) gets a zero update, in the parameter's dtype when
    ``params`` are passed, and keeps its moments.

    Args:
      strategy: how S follows from a unit's statistics: ``"additive"``
        (:math:`1 + \gamma a`), ``"multiplicative"`` (:math:`\gamma^{|a|}`)
        or ``"depth"`` (:math:`(1+\gamma)^{(d_m-1-d)/d_m}`); :math:`a` is the
        unit's connection count's signed distance from the median, scaled to
        [-1, 1], :math:`d` its depth and :math:`d_m` the number of depths.
      gamma: the strategy's scaling factor; ``None`` is the reference default
        (0.95 additive, 5.0 multiplicative, 1.0 depth).
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator (where: see ``eps_placement``), > 0.
      layers: a :class:`~adaptive_moments.LayerTable`, a callable
        ``params -> LayerTable`` (declare it in ``static_args`` of
        ``optax.inject_hyperparams``) or ``None`` to derive the table from the
        tree the transformation receives (paths and shapes; under
        ``optax.masked`` that is the unmasked subset).
      structure: the unit S is constant over: ``"layer"`` (all parameters of
        a layer share one connection count, one depth and one S),
        ``"variable"`` (each tensor is a unit) or ``"reference"``
        (bug-compatible with the Keras package: short-name collisions, c = 0
        for 1-D tensors, depth = tensor index, NaN/inf on degenerate
        statistics).
      signed: multiplicative strategy only: :math:`S = \gamma^{a}` (units
        smaller than the median up, larger ones down) instead of the
        reference's :math:`\gamma^{|a|}`.
      amsgrad: divide by the running max of the second moment (``"optax"``
        placement: of the bias-corrected v, as ``optax.amsgrad``; ``"keras"``:
        of the raw v, as the reference); kept in ``nu_max``.
      eps_placement: ``"optax"`` adds epsilon to the bias-corrected
        :math:`\sqrt{\hat v_t}` (textbook Adam); ``"keras"`` adds it to the raw
        :math:`\sqrt{v_t}` and folds the bias corrections into the step size,
        as the Keras reference does.
      mu_dtype: dtype of the first moment; ``None`` infers it from params.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`; its
      state is a :class:`~adaptive_moments.ScaleByConnectionAwareState`.

    .. seealso:: :func:`~adaptive_moments.caadam` (this transformation with a
      learning rate and weight decay, and the maths),
      :func:`~adaptive_moments.caadam_keras` (the Keras reference's preset).
    """
    _validation.check_choice("strategy", strategy, _options.STRATEGIES)
    _validation.check_choice("structure", structure, _options.STRUCTURES)
    _validation.check_choice("eps_placement", eps_placement, _options.EPS_PLACEMENTS)
    _validation.check_beta("b1", b1)
    _validation.check_beta("b2", b2)
    _validation.check_positive("eps", eps, "eps = 0 divides 0 by 0 for a zero gradient")
    resolved_gamma = _caadam_scales.default_gamma(strategy, gamma)
    _caadam_scales.check_gamma(strategy, resolved_gamma)
    if isinstance(layers, _table.LayerTable):  # fail early on a bad table
        _caadam_scales.scale_factors(
            layers.rows, strategy, resolved_gamma, structure=structure, signed=signed
        )
    mu_dtype = _moments.canonical_dtype(mu_dtype)
    who = "scale_by_connection_aware"

    def init_fn(params):
        _paths.check_not_flattened(params, who)
        mu, nu = _moments.init_moments(params, mu_dtype)
        nu_max = optax.tree.zeros_like(params) if amsgrad else ()
        return ScaleByConnectionAwareState(
            count=jnp.zeros([], jnp.int32), mu=mu, nu=nu, nu_max=nu_max
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _paths.check_not_flattened(updates, who)
        table = _labeler.resolve_table(layers, updates, who)
        scales = _caadam_scales.LeafScales(
            table.rows,
            table.lookup,
            strategy,
            resolved_gamma,
            structure=structure,
            signed=signed,
        )
        count = _moments.increment(state.count)
        mu, nu = _moments.update_moments(updates, state.mu, state.nu, b1, b2)

        def make_scalars(cd):
            bc1 = 1 - _moments.decay_power(b1, count, cd)
            bc2 = 1 - _moments.decay_power(b2, count, cd)
            alpha = jnp.sqrt(bc2) / bc1 if eps_placement == "keras" else None
            return bc1, bc2, jnp.asarray(eps, cd), alpha

        # Scalars shared by all leaves of a dtype, built once (small traces).
        scalars = _moments.per_dtype(make_scalars)

        if amsgrad and eps_placement == "keras":
            # Keras: max of the raw v, kept raw.
            nu_max = jax.tree.map(
                lambda a, b: (
                    None if b is None else jnp.maximum(a, b) if _moments.is_trained(b) else a
                ),
                state.nu_max,
                nu,
                is_leaf=_paths.is_none,
            )
        elif amsgrad:
            # optax.amsgrad: max of the bias-corrected v.
            def corrected_max(old, v):
                if v is None or not _moments.is_trained(v):
                    return old if v is not None else None
                cd = _moments.compute_dtype(v.dtype)
                bc2 = _moments.cast(scalars(_moments.real_dtype(cd))[1], cd)
                return jnp.maximum(old.astype(cd), v.astype(cd) / bc2).astype(old.dtype)

            nu_max = jax.tree.map(corrected_max, state.nu_max, nu, is_leaf=_paths.is_none)
        else:
            nu_max = ()

        def direction(path, g, m, v, vmax):
            if not _moments.is_trained(g):
                return None  # filled by fill_untrained
            cd = _moments.compute_dtype(g.dtype)
            rd = _moments.real_dtype(cd)
            s = jnp.asarray(scales.for_leaf(path, g.shape, who), rd)
            m = _moments.cast(m, cd)
            bc1, bc2, e, alpha = scalars(rd)
            # S multiplies the finished Adam direction: folded into m first,
            # S * m would overflow near the top of the float range.
            # Real factors, cast to cd: a no-op unless the leaf is complex.
            if eps_placement == "keras":
                v_used = _moments.real_part(_moments.cast(vmax if amsgrad else v, cd))
                den = _moments.cast(jnp.sqrt(v_used) + e, cd)
                out = _moments.cast(s * alpha, cd) * (m / den)
            else:
                if amsgrad:
                    v_hat = _moments.real_part(_moments.cast(vmax, cd))
                else:
                    v_hat = _moments.real_part(_moments.cast(v, cd)) / bc2
                den = _moments.cast(jnp.sqrt(v_hat) + e, cd)
                out = _moments.cast(s, cd) * ((m / _moments.cast(bc1, cd)) / den)
            return _moments.cast(out, g.dtype)

        vmax_tree = nu_max if amsgrad else nu
        new_updates = _paths.map_with_path(direction, updates, mu, nu, vmax_tree)
        new_updates = _moments.fill_untrained(new_updates, updates, params)
        mu = optax.tree.cast(mu, mu_dtype)
        return new_updates, ScaleByConnectionAwareState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def caadam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    strategy: _options.Strategy = "multiplicative",
    gamma: jax.typing.ArrayLike | None = None,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    layers: _table.LayerTable | Any | None = None,
    structure: _options.Structure = "layer",
    signed: bool = False,
    amsgrad: bool = False,
    eps_placement: _options.EpsPlacement = "optax",
    weight_decay: jax.typing.ArrayLike = 0.0,
    weight_decay_mask: Any | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""CaAdam: Adam whose step is scaled per layer by its connection count.

    Each parameter's Adam step is multiplied by a constant factor :math:`S`
    computed once, on the host, from the model's structure: how many
    connections (fan-in x fan-out weights) its layer has relative to the other
    layers, or how deep the layer sits in the forward pass.

    .. math::

      \begin{align*}
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        u_t &= -\eta_t\, S \,\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}
          + \epsilon} - \eta_t \lambda \theta_{t-1}
      \end{align*}

    With ``a = (med - c)/(med - c_min)`` for ``c <= med`` and
    ``-(c - med)/(c_max - med)`` otherwise (c: the unit's connection count;
    statistics over all units with connections):

    * ``"additive"`` (gamma 0.95): :math:`S = 1 + \gamma a`;
    * ``"multiplicative"`` (gamma 5.0): :math:`S = \gamma^{|a|}` as the
      reference codes it (S >= 1 on both sides of the median), or
      :math:`\gamma^{a}` with ``signed=True`` (small layers up, large down);
    * ``"depth"`` (gamma 1.0): :math:`S = (1+\gamma)^{(d_m - 1 - d)/d_m}`.

    ``eps_placement="keras"`` puts epsilon on the raw :math:`\sqrt{v_t}` as
    the Keras reference does: :math:`S\,\sqrt{1-\beta_2^t}/(1-\beta_1^t)\,
    m_t/(\sqrt{v_t}+\epsilon)`; see :func:`caadam_keras` for the preset that
    reproduces the reference step for step.

    Args:
      learning_rate: a scalar or an optax schedule.
      strategy: ``"additive"``, ``"multiplicative"`` or ``"depth"``.
      gamma: the strategy's scaling factor; ``None`` is the reference default
        (0.95 / 5.0 / 1.0).
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator, > 0.
      layers: the layer table, a callable building it, or ``None`` to derive
        it from the tree's paths and shapes (details: the transformation's
        docstring).
      structure: ``"layer"``, ``"variable"`` or ``"reference"``: the unit S
        is constant over (details: the transformation's docstring).
      signed: use the signed multiplicative formula.
      amsgrad: keep the running max of the second moment and divide by it.
      eps_placement: ``"optax"`` (textbook Adam) or ``"keras"``.
      weight_decay: decoupled weight decay, scaled by the learning rate but
        not by S (as the Keras base class applies it).
      weight_decay_mask: a tree or callable selecting the decayed parameters.
      mu_dtype: dtype of the first moment; ``None`` infers it from params.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import adaptive_moments as am
      >>> params = {'a': {'kernel': jnp.ones((3, 4)), 'bias': jnp.zeros(4)},
      ...           'b': {'kernel': jnp.ones((4, 1)), 'bias': jnp.zeros(1)}}
      >>> loss = lambda p: jnp.sum((jnp.tanh(jnp.ones(3) @ p['a']['kernel']
      ...     + p['a']['bias']) @ p['b']['kernel'] + p['b']['bias']) ** 2)
      >>> opt = am.caadam(1e-2, strategy='additive')
      >>> state = opt.init(params)
      >>> for _ in range(3):
      ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      ...   print(f'{loss(params):.4f}')
      15.0779
      14.3331
      13.6081

    References:
      Genet & Inzirillo, `CaAdam: Improving Adam optimizer using connection
      aware methods <https://arxiv.org/abs/2410.24216>`_, 2024.

    .. seealso:: :func:`~adaptive_moments.scale_by_connection_aware` (the
      transformation without learning rate and weight decay; every argument
      in full), :func:`~adaptive_moments.caadam_keras`.
    """
    inner = scale_by_connection_aware(
        strategy,
        gamma,
        b1,
        b2,
        eps,
        layers=layers,
        structure=structure,
        signed=signed,
        amsgrad=amsgrad,
        eps_placement=eps_placement,
        mu_dtype=mu_dtype,
    )
    return _weight_decay.chain_with_decay(inner, learning_rate, weight_decay, weight_decay_mask)


def caadam_keras(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    strategy: _options.Strategy = "additive",
    gamma: jax.typing.ArrayLike | None = None,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-7,
    *,
    layers: _table.LayerTable | Any | None = None,
    amsgrad: bool = False,
    weight_decay: jax.typing.ArrayLike = 0.0,
    weight_decay_mask: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The Keras ``caadam`` package's optimizer, step for step.

    ``structure="reference"`` (short-name collisions, c = 0 for 1-D tensors,
    depth = tensor index), epsilon 1e-7 added to the square root of the raw v,
    AMSGrad on the raw v, decoupled weight decay scaled by the learning rate
    and not by S. Which tensor counts as "last" and each tensor's depth follow
    the table's order, so pass a table built with the model's Keras variable
    order (construction order, kernel before bias), e.g.
    ``am.layer_table(params, order=[...])``; without one the fallback order of
    :func:`~adaptive_moments.layer_table` is used.

    Note the reference's defaults: ``CaAdam()`` without a strategy uses the
    additive strategy with gamma 0.9, while every strategy built without an
    argument (what the paper's experiments did) uses 0.95 / 5.0 / 1.0; here
    ``gamma=None`` means the latter.

    Args:
      learning_rate: a scalar or an optax schedule.
      strategy: ``"additive"`` (the reference's default), ``"multiplicative"``
        or ``"depth"``.
      gamma: the strategy's scaling factor; ``None`` is 0.95 / 5.0 / 1.0.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the square root of the raw v, > 0 (Keras' 1e-7).
      layers: the layer table (in Keras variable order), a callable building
        it, or ``None`` for the fallback order.
      amsgrad: divide by the running max of the raw v.
      weight_decay: decoupled weight decay, scaled by the learning rate but
        not by S.
      weight_decay_mask: a tree or callable selecting the decayed parameters.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import adaptive_moments as am
      >>> params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.zeros(2)}}
      >>> opt = am.caadam_keras(1e-3, 'multiplicative')
      >>> updates, _ = opt.update(params, opt.init(params))
      >>> print(updates['dense']['kernel'][0, 0])
      -0.00099999...

    .. seealso:: :func:`~adaptive_moments.caadam`,
      :func:`~adaptive_moments.scale_by_connection_aware`.
    """
    return caadam(
        learning_rate,
        strategy,
        gamma,
        b1,
        b2,
        eps,
        layers=layers,
        structure="reference",
        amsgrad=amsgrad,
        eps_placement="keras",
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
    )


def caadam_scales(
    params: Any,
    strategy: _options.Strategy = "multiplicative",
    gamma: Any = None,
    *,
    layers: _table.LayerTable | Any | None = None,
    structure: _options.Structure = "layer",
    signed: bool = False,
) -> Any:
    """CaAdam's S for every parameter, as a tree shaped like ``params``.

    The factors :func:`scale_by_connection_aware` multiplies each leaf's
    Adam direction by, through the same route from leaf to S.

    Args:
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      strategy: ``"additive"``, ``"multiplicative"`` or ``"depth"``.
      gamma: the strategy's scaling factor; ``None`` is its reference default.
      layers: a :class:`~adaptive_moments.LayerTable`, a callable
        ``params -> LayerTable`` or ``None`` to derive it from ``params``.
      structure: ``"layer"``, ``"variable"`` or ``"reference"``.
      signed: the signed multiplicative formula.

    Returns:
      A tree like ``params`` whose leaves are float64 NumPy arrays: a scalar,
      or a vector along the stack axis for a scan-stacked leaf whose slices
      differ.

    Example:
      >>> import jax.numpy as jnp
      >>> import adaptive_moments as am
      >>> params = {'a': {'kernel': jnp.zeros((8, 4))}, 'b': {'kernel': jnp.zeros((4, 2))},
      ...           'c': {'kernel': jnp.zeros((2, 1))}}
      >>> s = am.caadam_scales(params, 'multiplicative')
      >>> {k: round(float(v['kernel']), 4) for k, v in s.items()}
      {'a': 5.0, 'b': 1.0, 'c': 5.0}
    """
    who = "caadam_scales"
    table = _labeler.resolve_table(layers, params, who)
    scales = _caadam_scales.LeafScales(
        table.rows, table.lookup, strategy, gamma, structure=structure, signed=signed
    )

    def one(path, leaf):
        shape = _paths.leaf_shape(leaf)
        return np.asarray(scales.for_leaf(path, shape, who), np.float64)[()]

    return _paths.map_with_path(one, params)
