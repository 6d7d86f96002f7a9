"""Running a test module's Triton tests under TRITON_INTERPRET=1 (CPU). The variable must be set before
triton's first import, so a module whose process has no working interpreter re-runs itself in a child
pytest process with it set (and a flag so that the child does not recurse)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def interpreter_ready() -> bool:
    """True if triton here runs on CPU tensors (TRITON_INTERPRET=1 set before triton's first import)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton
        import triton.language.standard as std
    except ImportError:
        return False
    return not isinstance(std.sum, triton.runtime.JITFunction)


def run_module_in_interpreter(test_file: str, child_flag: str, timeout: int = 900) -> None:
    """Run every test of `test_file` in a child pytest with TRITON_INTERPRET=1 and `child_flag`=1; assert it
    passed (the tail of its output is the assertion message)."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{child_flag: "1"})
    r = subprocess.run([sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-x", "-q",
                        "-o", "addopts=", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    tail = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "failed" not in r.stdout, tail


def run_script_in_interpreter(script: str, timeout: int = 300) -> str:
    """Run a Python script (text) in a child process with TRITON_INTERPRET=1 and the repository on the path;
    assert it exited 0 and return its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout
