"""Dataflow depth: layer application levels from one walk of a jaxpr.

Framework-agnostic; used by the Flax adapters' ``depth="dataflow"``.

Method. Trace ``fn(params, consts, *inputs)`` to a jaxpr and walk it once,
keeping for every value what it depends on (:data:`Info`): nothing (a
constant, ``None``), parameters only (:class:`Params`: which leaves) or the
data (:class:`Data`) with a level, the number of layer applications on the
longest chain from the inputs. An equation that combines data with parameters
of layers L is an application of L at level max(input levels) + 1, unless it
continues an application already open on its data input (same layers,
parameters not yet consumed by it: the bias add after a matmul, the second
LoRA factor, LayerNorm's bias after its scale). So parallel branches (Q, K,
V) get equal levels, and a tied embedding gets one level per use. Calls
(jit, remat, custom_jvp/vjp) are entered; cond/while bodies are walked once;
a scan is unrolled when stacked parameters are its xs (slice i of every
stacked leaf is then layer slice i), and walked once otherwise.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from adaptive_moments import _paths

Tag = tuple[int, int | None]  # (parameter leaf index, slice; None: the whole leaf)
Unit = tuple[str, int | None]  # (layer, slice; None: every slice)


class Params(NamedTuple):
    """A value derived from parameters only."""

    tags: frozenset[Tag]


class Data(NamedTuple):
    """A value derived from the data."""

    level: int  # layer applications on the longest chain from the inputs
    open_units: frozenset[Unit]  # units of the application that made it
    consumed: frozenset[Tag]  # parameters that application has already used


Info = Params | Data | None  # None: a constant

_INPUT = Data(0, frozenset(), frozenset())


def _params_of(infos: Sequence[Info]) -> Params | None:
    tags = frozenset().union(*(i.tags for i in infos if isinstance(i, Params)))
    return Params(tags) if tags else None


def _deepest(datas: Sequence[Data]) -> Data:
    """The data inputs at the deepest level, joined: their open applications
    and consumed parameters together."""
    base = max(d.level for d in datas)
    top = [d for d in datas if d.level == base]
    return Data(
        base,
        frozenset().union(*(d.open_units for d in top)),
        frozenset().union(*(d.consumed for d in top)),
    )


def _merge(infos: Sequence[Info]) -> Info:
    """The value of one output of branches or iterations (cond, while, scan ys)."""
    datas = [i for i in infos if isinstance(i, Data)]
    return _deepest(datas) if datas else _params_of(infos)


class _Flow:
    def __init__(self, leaf_layer: Sequence[str], stacked: Sequence[bool]):
        self.leaf_layer = leaf_layer
        self.stacked = stacked
        self.apps: dict[Unit, set[int]] = {}

    def generic(self, ins: Sequence[Info]) -> Info:
        params = _params_of(ins)
        datas = [i for i in ins if isinstance(i, Data)]
        if not datas:
            return params
        data = _deepest(datas)
        if params is None:
            return data
        tags = params.tags
        units = frozenset((self.leaf_layer[i], s) for i, s in tags)
        if units <= data.open_units and not (tags & data.consumed):
            return data._replace(consumed=data.consumed | tags)
        for u in units:
            self.apps.setdefault(u, set()).add(data.level + 1)
        return Data(data.level + 1, units, tags)

    def run(self, jaxpr: Any, ins: Sequence[Info]) -> list[Info]:
        from jax.extend import core as jcore

        if isinstance(jaxpr, jcore.ClosedJaxpr):
            jaxpr = jaxpr.jaxpr
        env: dict[Any, Info] = {}
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

    def equation(self, eqn: Any, args: list[Info]) -> list[Info]:
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
            return [_merge([a, b]) for a, b in zip(carry, outs)]
        if name == "cond":
            branch_outs = [self.run(b, args[1:]) for b in p["branches"]]
            return [_merge(list(col)) for col in zip(*branch_outs)]
        for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
            sub = p.get(key)
            if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                inner = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
                if len(inner.invars) == len(args) and len(inner.outvars) == n_out:
                    return self.run(sub, args)
        return [self.generic(args)] * n_out

    def _whole_stacked(self, tag: Tag) -> bool:
        i, s = tag
        return s is None and self.stacked[i]

    def scan(self, eqn: Any, args: list[Info]) -> list[Info]:
        p = eqn.params
        if "ft_in" in p:
            # jax >= 0.11 groups the operands as a FlatTree (consts, carry, xs)
            # in place of the num_consts / num_carry counts.
            consts, carry, xs = (list(group) for group in p["ft_in"].update(args).unpack())
        else:
            nc, nk = p["num_consts"], p["num_carry"]
            consts, carry, xs = args[:nc], args[nc : nc + nk], args[nc + nk :]
        nk = len(carry)
        unroll = any(
            isinstance(x, Params) and any(self._whole_stacked(t) for t in x.tags) for x in xs
        )
        steps = range(p["length"]) if unroll else [None]
        if unroll and p.get("reverse"):
            steps = reversed(steps)
        ys_all: list[list[Info]] = []
        for it in steps:
            xs_it = xs
            if it is not None:  # iteration `it` reads slice `it` of stacked leaves
                xs_it = [
                    Params(
                        frozenset((i, it if self._whole_stacked((i, s)) else s) for i, s in x.tags)
                    )
                    if isinstance(x, Params)
                    else x
                    for x in xs
                ]
            outs = self.run(p["jaxpr"], consts + carry + xs_it)
            carry = outs[:nk]
            ys_all.append(outs[nk:])
        ys = [_merge(list(col)) for col in zip(*ys_all)]
        return carry + ys


def dataflow_levels(
    fn: Callable[..., Any],
    params: Any,
    consts: Any,
    inputs: Sequence[Any],
    layer_of: Mapping[str, str],
    stacked: Mapping[str, bool],
) -> dict[Unit, list[int]]:
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
    ins: list[Info] = []
    for k, (p, _) in enumerate(flat_params):
        path = _paths.normalize_path(p)
        leaf_layer.append(layer_of.get(path, ""))
        leaf_stacked.append(bool(stacked.get(path, False)))
        ins.append(Params(frozenset({(k, None)})) if path in layer_of else None)
    ins += [None] * n_consts
    n_data = len(closed.jaxpr.invars) - n_params - n_consts
    ins += [_INPUT] * n_data
    flow = _Flow(leaf_layer, leaf_stacked)
    flow.run(closed, ins)
    return {u: sorted(v) for u, v in flow.apps.items()}
