"""The string options of the public API: one ``Literal`` type each.

Each option's values are written once, in its ``Literal``; the tuple a check
compares against is derived from it, so a type checker and the runtime
``ValueError`` agree. A leaf module: every other module may import it.
"""

from typing import Literal, get_args

Strategy = Literal["additive", "multiplicative", "depth"]
"""CaAdam's scaling strategy: how a unit's S follows from its connections or depth."""

Structure = Literal["layer", "variable", "reference"]
"""CaAdam's unit of S: a layer, a parameter tensor, or the Keras reference's short name."""

EpsPlacement = Literal["optax", "keras"]
"""Where CaAdam adds epsilon: to the bias-corrected or to the raw square root of v."""

DepthPolicy = Literal["call", "dataflow"]
"""How the Flax labeler assigns depth: forward call order or dataflow levels."""

STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
STRUCTURES: tuple[Structure, ...] = get_args(Structure)
EPS_PLACEMENTS: tuple[EpsPlacement, ...] = get_args(EpsPlacement)
DEPTH_POLICIES: tuple[DepthPolicy, ...] = get_args(DepthPolicy)
