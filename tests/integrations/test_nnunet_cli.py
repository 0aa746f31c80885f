"""The nnU-Net command line's helpers (monai_ood.integrations.nnunet.cli): the trainer folder nnU-Net
discovers, the export line that keeps other trainer folders, and ``env`` without loading nnU-Net.
The ``predict`` and ``calibrate`` commands run in test_nnunet_integration.py."""

from __future__ import annotations

import os

import pytest
from nnunet_helpers import require_nnunet

require_nnunet()

from monai_ood.integrations.nnunet import (  # noqa: E402
    export_line,
    find_trainer_class,
    nnUNetTrainerPrototypeOOD,
    trainer_folder,
)


def test_trainer_folder_is_what_nnunet_discovers():
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = str(trainer_folder())
    found = recursive_find_python_class(
        folder, "nnUNetTrainerPrototypeOOD", None, base_folder=folder, cleanup_imports_from_base_folder=True
    )
    assert found is nnUNetTrainerPrototypeOOD  # the package's class, not a second copy
    assert find_trainer_class("nnUNetTrainerPrototypeOOD") is nnUNetTrainerPrototypeOOD


def test_export_line_keeps_other_trainer_folders():
    ours = str(trainer_folder())
    assert export_line(current="") == f"export nnUNet_extTrainer={ours}"
    assert (
        export_line(current=f"/my/trainers{os.pathsep}{ours}")
        == f"export nnUNet_extTrainer=/my/trainers{os.pathsep}{ours}"
    )
    assert export_line(current="/my/trainers") == f"export nnUNet_extTrainer={ours}{os.pathsep}/my/trainers"
    assert export_line("fish", current="").startswith("set -gx nnUNet_extTrainer ")
    assert export_line("powershell", current="") == f'$env:nnUNet_extTrainer = "{ours}"'
    with pytest.raises(ValueError, match="shell"):
        export_line("tcsh")


def test_env_command_runs_without_loading_nnunet(capsys):
    import subprocess
    import sys

    code = (
        "import sys; from monai_ood.integrations.nnunet.cli import main; main(['env']); "
        "print(any(m.startswith('nnunetv2') for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line, loaded = result.stdout.strip().splitlines()
    assert line.startswith("export nnUNet_extTrainer=") and str(trainer_folder()) in line
    assert loaded == "False"
