"""Shared set-up of the kernel tests."""
import os
import subprocess
import sys

import pytest


@pytest.fixture
def triton_interpreted():
    """Runs Python source in a subprocess with TRITON_INTERPRET=1 (Triton kernels on CPU tensors; the
    variable must be set before triton is imported); asserts it succeeded and returns its stdout."""
    pytest.importorskip("triton")

    def run(source):
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout
    return run
