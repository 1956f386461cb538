"""Token reduction for timm Vision Transformers."""

import os

# OpenMP threads that spin while they wait make small CPU ops many times slower as soon as another
# process shares the cores (measured on the quickstart model, 2 threads, busy 2-core machine: 1.7 s
# per training step spinning vs 0.07 s passive). Sleeping waiters cost little on a quiet machine.
# It only takes effect when set before torch is imported, which every entry point here does by
# importing `src` first; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
