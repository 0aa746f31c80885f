"""The README's example and the demo script must keep working: run them as a user would."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        if "a_xi" in namespace:
            a_xi = namespace["a_xi"]
            assert a_xi.shape == (4, 1, 64, 64) and float(a_xi.min()) >= 0 and float(a_xi.max()) <= 1


def test_quickstart_runs_a_few_steps():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "3", "--batch-size", "2"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "InD test" in result.stdout and "uniform noise" in result.stdout
