"""simlab: federated, continual medical image segmentation across drifting hospitals."""

import os as _os
import platform as _platform

__version__ = "0.1.0"

# The same numbers on every x86-64 CPU. PyTorch's CPU kernels (ATen) and oneDNN's convolutions pick
# their instruction set at run time, and AVX-512 kernels round differently from AVX2 ones: a 3-round
# training run's losses differ in the 7th digit and, over rounds, a headline metric by several
# hundredths (the regression scenario's replay-ida forgetting: 0.014 with AVX2, 0.079 with AVX-512).
# Both libraries read these variables lazily, at their first kernel, so setting them when simlab is
# imported (before any tensor is computed, and before Ray or Flower start a worker, which inherits
# them) pins every process of a run to AVX2, which every x86-64 CPU of the last decade has. Measured on
# a 2-core AVX-512 machine, a U-Net training step (batch 16, 64 px, one thread) took 69-97 ms with
# AVX2 against 113 ms with AVX-512: nothing is lost. An explicit setting in
# the environment wins (e.g. ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=ALL for the fastest
# kernels, giving up cross-machine identity); other architectures are left alone.
if _platform.machine().lower() in ("x86_64", "amd64"):
    _os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    _os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
