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


class _Parsed(Exception):
    """Stops nnU-Net's entry point right after it parsed its arguments."""


def _nnunet_arguments(entry_point, argv: list[str], monkeypatch):
    """The namespace nnU-Net's own entry point parses from ``argv`` (nothing is predicted)."""
    import argparse
    import sys

    parse = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", ["nnUNetv2_predict", *argv])
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
        with pytest.raises(_Parsed) as parsed:
            entry_point()
    return parsed.value.args[0]


def _option_strings(help_text: str) -> set[str]:
    """The option strings of an argparse help text (its option lines: ``  -x X, --long X   help``)."""
    import re

    found = set()
    for line in help_text.splitlines():
        match = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)
        if match:
            found.update(part.split()[0] for part in match.group(1).split(", "))
    return found


@pytest.mark.parametrize("npp, nps", [(None, None), ("5", "not a number")])
def test_predict_takes_nnunet_predicts_flags_with_its_defaults(npp, nps, monkeypatch, capsys):
    from nnunetv2.inference import predict_from_raw_data as nnunet

    from monai_ood.integrations.nnunet.cli import build_parser

    for name, value in (("nnUNet_npp", npp), ("nnUNet_nps", nps)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    folders = ["-i", "in", "-o", "out"]
    ours = build_parser().parse_args(["predict", *folders, "-d", "1", "-c", "3d_fullres"])
    theirs = _nnunet_arguments(
        nnunet.predict_entry_point, [*folders, "-d", "1", "-c", "3d_fullres"], monkeypatch
    )
    shared = [
        "npp",
        "nps",
        "num_parts",
        "part_id",
        "chk",
        "not_on_device",
        "continue_prediction",
        "step_size",
    ]
    shared += ["disable_tta", "save_probabilities", "prev_stage_predictions", "p", "disable_progress_bar"]
    assert {k: getattr(ours, k) for k in shared} == {k: getattr(theirs, k) for k in shared}
    assert (ours.npp, ours.nps) == ((5, 3) if npp else (3, 3))

    flags = ["-num_parts", "3", "-part_id", "2", "--not_on_device", "-npp", "0", "-nps", "0", "-chk", "x.pth"]
    ours = build_parser().parse_args(["predict", *folders, "-m", "model", "--c", *flags])
    theirs = _nnunet_arguments(
        nnunet.predict_entry_point, [*folders, "-d", "1", "-c", "c", *flags], monkeypatch
    )
    assert (ours.num_parts, ours.part_id, ours.continue_prediction) == (3, 2, True)
    assert {k: getattr(ours, k) for k in ("not_on_device", "npp", "nps", "chk")} == {
        k: getattr(theirs, k) for k in ("not_on_device", "npp", "nps", "chk")
    }

    # every flag of nnUNetv2_predict and nnUNetv2_predict_from_modelfolder is in our --help
    helps = {}
    for name, entry_point in (
        ("predict", nnunet.predict_entry_point),
        ("modelfolder", nnunet.predict_entry_point_modelfolder),
    ):
        monkeypatch.setattr("sys.argv", [name, "-h"])
        with pytest.raises(SystemExit):
            entry_point()
        helps[name] = _option_strings(capsys.readouterr().out)
    from monai_ood.integrations.nnunet.cli import main

    with pytest.raises(SystemExit):
        main(["predict", "-h"])
    our_help = capsys.readouterr().out
    assert "--c" in helps["modelfolder"] and "-num_parts" in helps["predict"]  # the parsing found them
    assert helps["predict"] | helps["modelfolder"] <= _option_strings(our_help)
    assert "$nnUNet_npp" in our_help and "$nnUNet_nps" in our_help
