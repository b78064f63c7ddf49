"""A bounded run of the coverage-guided span fuzzer (tests/fuzz/fuzz_spans.py) in every test run.

The fuzzer's own oracles (see its docstring) fail the input; libFuzzer then exits non-zero and
prints the input and the Python traceback, which this test shows. A fixed seed keeps the run
reproducible; longer runs (`-max_total_time=3600`) are for a developer's machine.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import IN_CI, ROOT

RUNS = 30_000


def test_span_intake_survives_coverage_guided_fuzzing(tmp_path):
    try:
        import atheris  # noqa: F401
    except ImportError:
        message = "atheris is not installed (pip install -e '.[test]' installs it)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    corpus = tmp_path / "corpus"
    command = [sys.executable, "-m", "tests.fuzz.fuzz_spans"]
    subprocess.run([*command, "--write-seeds", str(corpus)], cwd=ROOT, check=True, capture_output=True)
    result = subprocess.run(
        [*command, str(corpus), f"-runs={RUNS}", "-seed=1", "-max_len=8192", f"-artifact_prefix={tmp_path}/"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert f"Done {RUNS} runs" in output, output[-2000:]
