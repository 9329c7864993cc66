"""GPU verification in one short window: ``python3 benchmarks/gpu_verify.py --build --out $OUT`` on the GPU machine
(one call of at most 590 s), ``python benchmarks/gpu_verify.py --rehearse --out DIR`` for the CPU rehearsal that
tests/benchmarks/test_gpu_verify.py runs. benchmarks/README.md has the recipe; the stages are in benchmarks/gpu_window/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, where the gpu_window package lives

from gpu_window.runner import main

if __name__ == "__main__":
    sys.exit(main())
