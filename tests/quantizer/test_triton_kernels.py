"""The CUDA kernels (GPTQ in-block loop, grouped Hessian SYRK) run here through Triton's
CPU interpreter and must match the torch code paths bit for bit (q) / to fp32 rounding.
(Their GPU speed and GPU numerics: benchmarks/gpu_checks.py on the device machine.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_kernels_match_torch_paths_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = Path(__file__).with_name("_triton_interpret_check.py")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("gptq kernel ok") == 3 and "syrk kernel ok" in out.stdout
