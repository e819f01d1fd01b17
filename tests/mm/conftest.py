"""Shared set-up of the OpenMMLab tests."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def mm_tool():
    """Runs ``<task>/tools/<tool>`` (task: detection or segmentation; a .py tool or a dist_*.sh script, which
    starts this interpreter's processes) in a subprocess on the generated data in ``data``; asserts it
    succeeded and returns its output. ``env`` adds environment variables."""
    def run(task, tool, *args, cwd, data, env=None):
        script = REPO / task / 'tools' / tool
        command = ['bash', str(script)] if tool.endswith('.sh') else [sys.executable, str(script)]
        env = {**os.environ, 'VMAMBA_DEMO_DATA': str(data), 'PYTHON': sys.executable, **(env or {})}
        proc = subprocess.run([*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr
    return run


@pytest.fixture
def logged_metrics():
    """The metrics of a tool's last evaluation in its log ('Iter(val|test) [n/n]  name: value ...'), as a dict."""
    def parse(log, loop):
        final = [line for line in log.splitlines() if re.search(rf'Iter\({loop}\) \[(\d+)/\1\]', line)][-1]
        return {name: float(value) for name, value in re.findall(r'(\S+): (-?[\d.]+)', final) if 'time' not in name}
    return parse
