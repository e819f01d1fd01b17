"""Shared set-up of the OpenMMLab tests."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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
