"""Optimizer specs: ``name[:key=value,...]`` strings -> optax transformations.

Examples: ``adam``, ``sgd``, ``caadam_additive``,
``caadam:strategy=depth,structure=reference``, ``exadam_v1``,
``adamw:weight_decay=0.004,lr=3e-4``, ``adam:lr=1.88e-3,tune=false``. ``lr``
overrides the run's learning rate for that optimizer; ``tune=false`` keeps it
at that rate when the others are tuned (a fixed comparison point, e.g. Adam
at the rate matching another optimizer's mean step); every other key is
passed to the constructor.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

import adaptive_moments as am

_Builder = Callable[..., optax.GradientTransformation]


def _caadam(lr: float, layers: am.LayerTable | None, **kw: Any) -> optax.GradientTransformation:
    return am.caadam(lr, layers=layers, **kw)


def _caadam_keras(
    lr: float, layers: am.LayerTable | None, **kw: Any
) -> optax.GradientTransformation:
    return am.caadam_keras(lr, layers=layers, **kw)


def _set_adam(lr: float, layers: am.LayerTable | None, **kw: Any) -> optax.GradientTransformation:
    return am.set_adam(lr, layers=layers, **kw)


def _plain(fn: Callable[..., optax.GradientTransformation]) -> _Builder:
    def build(lr: float, layers: am.LayerTable | None, **kw: Any) -> optax.GradientTransformation:
        del layers
        return fn(lr, **kw)

    return build


def _standard_promotion(fn: Callable[..., optax.GradientTransformation]) -> _Builder:
    """An optax baseline traced with standard dtype promotion.

    optax 0.2.8's ``bias_correction`` computes ``decay ** count`` with an int32
    count, which ``jax_numpy_dtype_promotion="strict"`` (the test suite's
    setting) rejects. Only the third-party ``update`` gets the standard rules;
    our own code and the adaptive_moments optimizers stay strict.
    """
    plain = _plain(fn)

    def build(lr: float, layers: am.LayerTable | None, **kw: Any) -> optax.GradientTransformation:
        tx = plain(lr, layers, **kw)

        def update(updates, state, params=None, **extra):
            del extra
            with jax.numpy_dtype_promotion("standard"):
                return tx.update(updates, state, params)

        return optax.GradientTransformationExtraArgs(tx.init, update)

    return build


# name -> (builder(lr, layers, **kwargs), default kwargs, description)
OPTIMIZERS: dict[str, tuple[_Builder, dict[str, Any], str]] = {
    "adam": (_standard_promotion(optax.adam), {}, "optax.adam"),
    "adamw": (
        _standard_promotion(optax.adamw),
        {"weight_decay": 0.01},
        "optax.adamw, weight decay 0.01 (PyTorch's default)",
    ),
    "adabelief": (_standard_promotion(optax.adabelief), {}, "optax.adabelief"),
    "nadam": (_standard_promotion(optax.nadam), {}, "optax.nadam"),
    "sgd": (_standard_promotion(optax.sgd), {"momentum": 0.9}, "optax.sgd, momentum 0.9"),
    "caadam": (_caadam, {}, "am.caadam (multiplicative, structure 'layer' unless given)"),
    "caadam_additive": (_caadam, {"strategy": "additive"}, "am.caadam additive, gamma 0.95"),
    "caadam_multiplicative": (
        _caadam,
        {"strategy": "multiplicative"},
        "am.caadam multiplicative, gamma 5",
    ),
    "caadam_depth": (_caadam, {"strategy": "depth"}, "am.caadam depth, gamma 1"),
    "caadam_keras": (_caadam_keras, {}, "am.caadam_keras (Keras reference step for step)"),
    "set_adam": (_set_adam, {}, "am.set_adam, tau 0.5"),
    "exadam": (_plain(am.exadam), {}, "am.exadam (paper v2 / current code)"),
    "exadam_v1": (_plain(am.exadam), {"log_step_size": True}, "am.exadam, log step size (v1)"),
}


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A parsed optimizer spec.

    Attributes:
      text: the spec as written (used as the label in tables and plots).
      name: the registered name.
      kwargs: constructor keyword arguments (registered defaults, then the
        spec's own).
      lr: learning-rate override, or ``None`` for the run's.
      tune: ``False``: never tuned (every seed at the base rate).
    """

    text: str
    name: str
    kwargs: dict[str, Any]
    lr: float | None = None
    tune: bool = True

    @property
    def label(self) -> str:
        return self.text

    def build(
        self, learning_rate: float, layers: am.LayerTable | None
    ) -> optax.GradientTransformation:
        """Builds the optax transformation (``layers`` is used by CaAdam / SET-Adam)."""
        builder = OPTIMIZERS[self.name][0]
        lr = self.lr if self.lr is not None else learning_rate
        try:
            return builder(lr, layers, **self.kwargs)
        except TypeError as e:  # an unknown keyword: say which spec
            raise ValueError(f"optimizer {self.text!r}: {e}") from None


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered == "none":
            return None
        return text


def parse_optimizer(text: str) -> OptimizerSpec:
    """Parses ``name[:key=value,...]``.

    Example:
      >>> spec = parse_optimizer("caadam:strategy=additive,structure=reference")
      >>> spec.name, spec.kwargs
      ('caadam', {'strategy': 'additive', 'structure': 'reference'})
      >>> parse_optimizer("adamw:lr=3e-4").lr
      0.0003
    """
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in OPTIMIZERS:
        known = ", ".join(OPTIMIZERS)
        raise ValueError(f"unknown optimizer {name!r} in {text!r}; known: {known}.")
    kwargs = dict(OPTIMIZERS[name][1])
    lr = None
    tune = True
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"optimizer {text!r}: expected key=value, got {item!r}.")
        key = key.strip()
        value = _value(val.strip())
        if key in ("lr", "learning_rate"):
            lr = float(value)
        elif key == "tune":
            if not isinstance(value, bool):
                raise ValueError(f"optimizer {text!r}: tune must be true or false, got {val!r}.")
            tune = value
        else:
            kwargs[key] = value
    return OptimizerSpec(text.strip(), name, kwargs, lr, tune)


def describe_optimizers() -> str:
    """One line per registered optimizer name (for ``--help``)."""
    return "\n".join(f"  {n:<22} {d}" for n, (_, _, d) in OPTIMIZERS.items())
