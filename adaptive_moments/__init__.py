"""Adaptive moments: CaAdam, SET-Adam and EXAdam as optax transformations.

>>> import adaptive_moments as am
>>> sorted(n for n in am.__all__ if not n[0].isupper())[:4]
['caadam', 'caadam_keras', 'caadam_scales', 'exadam']
"""

from importlib import metadata as _metadata
from typing import Any as _Any

from adaptive_moments._caadam import ScaleByConnectionAwareState as ScaleByConnectionAwareState
from adaptive_moments._caadam import caadam as caadam
from adaptive_moments._caadam import caadam_keras as caadam_keras
from adaptive_moments._caadam import caadam_scales as caadam_scales
from adaptive_moments._caadam import scale_by_connection_aware as scale_by_connection_aware
from adaptive_moments._exadam import ScaleByExadamState as ScaleByExadamState
from adaptive_moments._exadam import exadam as exadam
from adaptive_moments._exadam import scale_by_exadam as scale_by_exadam
from adaptive_moments._labeler import layer_table as layer_table
from adaptive_moments._paths import normalize_path as normalize_path
from adaptive_moments._row import LayerInfo as LayerInfo
from adaptive_moments._set_adam import ScaleBySetAdamState as ScaleBySetAdamState
from adaptive_moments._set_adam import scale_by_set_adam as scale_by_set_adam
from adaptive_moments._set_adam import set_adam as set_adam
from adaptive_moments._table import LayerTable as LayerTable

try:
    __version__ = _metadata.version("adaptive_moments")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

__all__ = [
    "LayerInfo",
    "LayerTable",
    "ScaleByConnectionAwareState",
    "ScaleByExadamState",
    "ScaleBySetAdamState",
    "caadam",
    "caadam_keras",
    "caadam_scales",
    "exadam",
    "layer_table",
    "normalize_path",
    "scale_by_connection_aware",
    "scale_by_exadam",
    "scale_by_set_adam",
    "set_adam",
]


def __getattr__(name: str) -> _Any:
    # The Flax adapters import flax, an optional dependency: load on first use.
    if name == "flax":
        import importlib

        return importlib.import_module("adaptive_moments.flax")
    raise AttributeError(f"module 'adaptive_moments' has no attribute {name!r}")
