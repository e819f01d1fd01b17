import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mm_tool():
    """Runs ``<task>/tools/<tool>`` (task: detection or segmentation) in a subprocess on the generated
    data in ``data``; asserts it succeeded and returns its output."""
    def run(task, tool, *args, cwd, data):
        env = dict(os.environ, VMAMBA_DEMO_DATA=str(data))
        proc = subprocess.run([sys.executable, str(REPO / task / 'tools' / tool), *map(str, args)],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr
    return run


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
