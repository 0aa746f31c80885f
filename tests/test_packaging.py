"""Every third-party module the main job imports (train -> fit -> calibrate -> score, including imports
deferred into functions) is a required dependency of the package, not only of an extra."""

import ast
import configparser
import importlib.metadata
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the modules of the main job's path; the bundles, nnU-Net, benchmark, plots and demo have their extras
CORE = [
    "engines/*.py",
    "networks/*.py",
    "calibration/*.py",
    "losses/*.py",
    "transforms/*.py",
    "detectors/base.py",
    "detectors/terms.py",
    "detectors/fused.py",
    "inference.py",
    "preprocessing.py",
    "files.py",
    "io/images.py",
    "io/tables.py",
    "data/*.py",
]


def _required_distributions() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in config["options"]["install_requires"].splitlines() if line.strip()]
    return {re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower() for line in lines}


def test_every_module_of_the_main_path_is_installed_by_install_requires():
    distributions = importlib.metadata.packages_distributions()
    required = _required_distributions()
    missing = {}
    files = sorted({p for pattern in CORE for p in (ROOT / "monai_ood").glob(pattern)})
    assert len(files) > 20
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "monai_ood":
                    continue
                owners = {d.lower() for d in distributions.get(top, [top])}
                if not owners & required:
                    missing.setdefault(top, []).append(path.relative_to(ROOT).as_posix())
    assert not missing, f"imported by the main path but not in install_requires: {missing}"
