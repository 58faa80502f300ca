"""``python -m adaptive_moments.experiments``: the main job (see ``--help``)."""

import sys

from adaptive_moments.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
