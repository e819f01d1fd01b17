"""Shared set-up of the kernel tests."""
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest


@pytest.fixture
def triton_interpreted():
    """Runs Python source in a subprocess with TRITON_INTERPRET=1 (Triton kernels on CPU tensors; the
    variable must be set before triton is imported); asserts it succeeded and returns its stdout.
    extension=False: the package imports as where its extension could not be built (SELECTIVE_SCAN_NO_EXTENSION)."""
    pytest.importorskip("triton")

    def run(source, extension=True):
        env = dict(os.environ, TRITON_INTERPRET="1", SELECTIVE_SCAN_NO_EXTENSION="0" if extension else "1")
        proc = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout
    return run


@pytest.fixture
def triton_interpreted_call(triton_interpreted, request):
    """Runs `call` (source such as 'check_cases("cpu")') on the requesting test module, loaded afresh in a
    TRITON_INTERPRET=1 subprocess (its folder on sys.path, for the sibling modules it imports); returns stdout."""
    path = pathlib.Path(request.module.__file__)

    def run(call):
        return triton_interpreted(textwrap.dedent(f"""
            import importlib.util, sys
            sys.path.insert(0, {str(path.parent)!r})
            spec = importlib.util.spec_from_file_location("interpreted_tests", {str(path)!r})
            tests = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(tests)
            tests.{call}
        """))
    return run
