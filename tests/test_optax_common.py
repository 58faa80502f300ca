"""optax's own common test suite for contributed optimizers, run on our aliases.

optax ships the tests every ``optax.contrib`` optimizer must pass in its wheel,
``optax/contrib/_common_test.py``: a registry of ``{'opt_name', 'opt_kwargs',
'wrapper_name', 'wrapper_kwargs'}`` dicts and an absltest class whose tests are
``parameterized.product`` s of that registry with other axes (targets, dtypes,
``wrap``). Here the *installed* module is executed a second time, under another
name, with ``parameterized.product`` handed :data:`REGISTRY` (our aliases and
their option sets) instead of optax's, and ``_get_opt_factory`` resolving our
names. So the tests, their bodies and every other axis are optax's own and
follow its releases; nothing of it is copied here.

optax's tests run under the root ``conftest.py`` (strict dtype promotion, rank
promotion that raises, warnings as errors), with one exception: the
``MultiSteps`` test gets JAX's standard dtype promotion, because
``optax.MultiSteps`` itself divides by its int32 step count and adds bf16
gradients to an f32 accumulator. A skip counts as a failure: the one skip an
alias can reach ("Optimizer doesn't accept a learning schedule") reads the
``learning_rate`` annotation, which must be ``optax.ScalarOrSchedule`` itself.
"""

import importlib.util
import inspect
import math
import re
import typing
from unittest import mock

import jax
import optax
from absl.testing import parameterized

import adaptive_moments as am

# Every alias and the option sets that take another code path in its update
# (signed S, amsgrad, Keras's eps placement, a bf16 first moment).
# optax's problems are one or two leaves with no layer names, which the default
# table puts in one root layer: CaAdam's S is 1 there except for the depth
# strategy with the variable or reference structure, and SET-Adam's statistics
# span both leaves of the mixed target. So this checks the machinery (extra
# args, jit, dtypes, wrappers, schedules, convergence), not the per-layer maths,
# which the conformance and numerics suites check on layered trees. Each CaAdam
# strategy and structure appears once (pairing them keeps the run short); the
# weight decays move optax's minimisers far less than its 3e-2 tolerance.
REGISTRY: tuple[tuple[str, dict[str, typing.Any]], ...] = (
    ("caadam", {"learning_rate": 1e-3}),  # multiplicative, layer
    ("caadam", {"learning_rate": 1e-3, "strategy": "additive", "structure": "variable",
                "weight_decay": 1e-3}),
    ("caadam", {"learning_rate": 1e-3, "strategy": "depth", "structure": "reference"}),
    # amsgrad's held max of v slows the last approach: 1e-3 stops short on the parabola.
    ("caadam", {"learning_rate": 1e-2, "gamma": 3.0, "signed": True, "amsgrad": True,
                "eps_placement": "keras", "eps": 1e-7, "mu_dtype": "bfloat16"}),
    ("caadam_keras", {"learning_rate": 1e-3}),
    ("caadam_keras", {"learning_rate": 1e-2, "strategy": "depth", "amsgrad": True}),
    ("set_adam", {"learning_rate": 1e-3, "weight_decay": 1e-3}),  # coupled
    ("set_adam", {"learning_rate": 1e-3, "tau": 0.0, "weight_decay": 1e-3,
                  "decoupled_weight_decay": True}),
    ("set_adam", {"learning_rate": 1e-3, "mu_dtype": "bfloat16"}),
    ("exadam", {"learning_rate": 1e-3}),
    ("exadam", {"learning_rate": 1e-3, "mu_dtype": "bfloat16"}),
    ("exadam", {"learning_rate": 1e-3, "log_step_size": True, "weight_decay": 1e-3}),
)

FACTORIES = {"caadam": am.caadam, "caadam_keras": am.caadam_keras,
             "set_adam": am.set_adam, "exadam": am.exadam}

_CASES = tuple(
    {"opt_name": name, "opt_kwargs": kwargs, "wrapper_name": None, "wrapper_kwargs": None}
    for name, kwargs in REGISTRY
)

# What optax's decorators asked for, one row per parameterized test: its name
# and the size of its other axes (checked by test_registry_reaches_every_test).
_PRODUCTS: list[tuple[str, int]] = []
_product = parameterized.product


def _our_product(*registries, **axes):
    """``parameterized.product`` with optax's registry replaced by ours."""
    if len(registries) != 1 or not all("opt_name" in c for c in registries[0]):
        raise AssertionError(
            "optax's common tests no longer pass one optimizer registry to "
            f"parameterized.product (got {len(registries)} positional arguments): "
            "update how this file injects REGISTRY"
        )
    decorate = _product(_CASES, **axes)

    def record(test_method):
        _PRODUCTS.append((test_method.__name__, math.prod(len(v) for v in axes.values())))
        return decorate(test_method)

    return record


def _load_optax_common_tests():
    """A second copy of the installed ``optax.contrib._common_test`` whose
    parameterized tests run over :data:`REGISTRY`."""
    spec = importlib.util.find_spec("optax.contrib._common_test")
    copy = importlib.util.spec_from_file_location("_optax_common_test_on_am", spec.origin)
    module = importlib.util.module_from_spec(copy)
    with mock.patch.object(parameterized, "product", _our_product):
        copy.loader.exec_module(module)
    module._get_opt_factory = FACTORIES.__getitem__
    return module


_optax_common = _load_optax_common_tests()


class OptaxCommonTest(_optax_common.ContribTest):
    """optax's ``ContribTest`` over :data:`REGISTRY` (every test is optax's)."""

    def setUp(self):
        super().setUp()
        if self._testMethodName.startswith("test_gradient_accumulation"):
            # optax.MultiSteps mixes int32/f32 and bf16/f32 (see module doc).
            self.enterContext(jax.numpy_dtype_promotion("standard"))

    def skipTest(self, reason):  # noqa: N802 (unittest's name)
        # Every test applies to every alias: a skip is a defect to fix here.
        self.fail(f"optax's common test was skipped for an adaptive_moments alias: {reason}")


def _generated_tests() -> list[str]:
    return [n for n in dir(OptaxCommonTest) if n.startswith("test_")]


def test_registry_reaches_every_test():
    """Every optax test runs on every registry entry, and on nothing else."""
    # The aliases are the public functions taking a learning rate.
    aliases = {
        n for n in am.__all__
        if inspect.isfunction(getattr(am, n))
        and "learning_rate" in inspect.signature(getattr(am, n)).parameters
    }
    assert {name for name, _ in REGISTRY} == set(FACTORIES) == aliases
    assert all(FACTORIES[n] is getattr(am, n) for n in aliases)
    # A test optax adds outside its registry's products would run once, not
    # per alias: the count then fails, so that someone decides what it means.
    original = {name for name, _ in _PRODUCTS}
    assert original, "optax's common tests defined no parameterized test"
    expected = len(REGISTRY) * sum(size for _, size in _PRODUCTS)
    assert len(_generated_tests()) == expected, (_generated_tests(), _PRODUCTS)
    for name in _generated_tests():
        assert any(name.startswith(o) for o in original), name
        assert getattr(OptaxCommonTest, name).__x_params_repr__  # an optax product case


def test_learning_rate_annotation_is_optax_type():
    """optax's schedule test reads the ``learning_rate`` annotation: it must be
    the object ``optax.ScalarOrSchedule``, not the string a ``from __future__
    import annotations`` module would leave."""
    for name, factory in FACTORIES.items():
        annotation = inspect.signature(factory).parameters["learning_rate"].annotation
        assert annotation is optax.ScalarOrSchedule, (name, annotation)


def _public_callables():
    import adaptive_moments.flax as amf

    found = [(n, getattr(am, n)) for n in am.__all__]
    found += [(f"flax.{n}", getattr(amf, n)) for n in amf.__all__]
    for name, obj in list(found):
        if inspect.isclass(obj):
            found += [
                (f"{name}.{k}", v.fget if isinstance(v, property) else v)
                for k, v in vars(obj).items()
                if (not k.startswith("_") or k == "__init__")
                and (inspect.isfunction(v) or isinstance(v, property))
            ]
    return found


def test_public_annotations_are_objects():
    """No public signature holds a string annotation, and every one resolves."""
    # optax.Updates is optax's recursive alias: it holds ForwardRef('ArrayTree'),
    # which typing resolves in the caller's namespace (optax's own
    # ScaleByAdamState needs the same localns).
    localns = {"ArrayTree": optax.Updates}
    for name, obj in _public_callables():
        typing.get_type_hints(obj, localns=localns)
        if inspect.isclass(obj):
            annotations = dict(getattr(obj, "__annotations__", {}))
        else:
            sig = inspect.signature(obj)
            annotations = {p: v.annotation for p, v in sig.parameters.items()}
            annotations["return"] = sig.return_annotation
        strings = {k: v for k, v in annotations.items() if isinstance(v, str)}
        assert not strings, (name, strings)


# Each transformation and its alias (or aliases), as optax pairs them.
_FAMILIES = {
    am.scale_by_connection_aware: (am.caadam, am.caadam_keras),
    am.scale_by_set_adam: (am.set_adam,),
    am.scale_by_exadam: (am.exadam,),
}


def _documented_args(fn) -> list[str]:
    """The argument names of the ``Args:`` section of ``fn``'s docstring."""
    doc = inspect.getdoc(fn) or ""
    section = re.search(r"^Args:\n((?:(?:  .*)?\n)*)", doc + "\n", re.MULTILINE)
    assert section, f"{fn.__name__} has no Args section"
    return re.findall(r"^  (\w+):", section.group(1), re.MULTILINE)


def _seealso(fn) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc[doc.index(".. seealso::") :]


def test_optimizer_docstrings_describe_every_argument():
    """``help()`` on a transformation or an alias shows every argument, in
    signature order, and each points to the other with ``.. seealso::``."""
    for transform, aliases in _FAMILIES.items():
        for fn in (transform, *aliases):
            assert _documented_args(fn) == list(inspect.signature(fn).parameters), fn.__name__
        for alias in aliases:
            assert f"adaptive_moments.{transform.__name__}`" in _seealso(alias), alias.__name__
            assert f"adaptive_moments.{alias.__name__}`" in _seealso(transform), alias.__name__
