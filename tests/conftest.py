"""Suite-wide settings."""

import pytest


@pytest.fixture(autouse=True)
def _plain_output_lines(monkeypatch):
    """Captured output is not a terminal, so ``monai-ood`` would start every line with its time; tests
    read the lines themselves (tests/test_cli.py::test_log_lines_are_timestamped_off_a_terminal checks
    the timestamps)."""
    monkeypatch.setenv("MONAI_OOD_LOG_TIMESTAMPS", "never")
