"""The demo (README's first command): a small VMamba learns the built-in digits on the CPU.

About 20 s of training on 2 idle cores (3 epochs of 1437 digits); it reaches about 94 % top-1
(chance: 10 %).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import classification

PACKAGE = Path(classification.__file__).resolve().parent
DEMO = [sys.executable, str(PACKAGE / "main.py"), "--cfg", str(PACKAGE / "configs" / "demo" / "vmamba_digits.yaml")]


@pytest.mark.slow
def test_demo_command_learns_the_digits(tmp_path):
    env = dict(os.environ, VMAMBA_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([*DEMO, "--output", str(tmp_path / "output")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (tmp_path / "cache" / "digits" / "val").is_dir(), "the digits are written under $VMAMBA_CACHE"
    assert "the built-in digits: no --data-path given" in result.stdout
    final = re.findall(r"Final validation accuracy: top-1 ([\d.]+)%", result.stdout)
    assert len(final) == 1, result.stdout[-4000:]
    assert float(final[0]) > 85.0
