"""``python -m adaptive_moments.experiments``: the main job (see ``--help``)."""

import os
import sys

# glibc gives freed memory back to the kernel and XLA's next step faults it in
# again, page by page: ~10,000 page faults per CNN step, a third of the job's CPU
# time in the kernel. XLA's threads allocate from per-thread arenas, whose heaps
# glibc deletes as soon as they are empty whatever MALLOC_TRIM_THRESHOLD_ says;
# a large MALLOC_TOP_PAD_ keeps them (measured: 8x fewer page faults, kernel time
# 5.9 s -> 0.7 s for 150 steps; BUILD_NOTES, "Tuned main job"). The thresholds do
# the same for the main arena and for buffers up to 32 MiB. glibc reads these only
# at start-up, so the process re-executes itself once with them set (unless the
# caller set any of them).
_MALLOC_ENV = {
    "MALLOC_TOP_PAD_": "268435456",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "MALLOC_MMAP_THRESHOLD_": "33554432",
}


def _reexec_with_malloc_settings() -> None:
    if any(k in os.environ for k in _MALLOC_ENV) or os.environ.get("AM_NO_REEXEC"):
        return
    env = {**os.environ, **_MALLOC_ENV}
    args = [sys.executable, "-m", "adaptive_moments.experiments", *sys.argv[1:]]
    try:
        os.execve(sys.executable, args, env)
    except OSError:
        pass  # run as we are: only slower


if __name__ == "__main__":
    _reexec_with_malloc_settings()
    from adaptive_moments.experiments.cli import main

    sys.exit(main())
