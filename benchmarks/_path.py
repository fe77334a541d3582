"""Make `import requant.*` work from a plain checkout (the GPU machine has no install):
maps requant.<component> onto the repo's top-level folders, as pyproject does."""
import importlib.util
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dirs() -> dict[str, str]:
    """requant's subpackages and their folders, from pyproject's package-dir (the one source)."""
    import tomllib

    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name.split(".", 1)[1]: folder for name, folder in dirs.items() if name.count(".") == 1}


def ensure_requant() -> None:
    if importlib.util.find_spec("requant") is not None:
        return
    tmp = Path(tempfile.mkdtemp(prefix="requant-path-"))
    pkg = tmp / "requant"
    pkg.mkdir()
    for name, folder in package_dirs().items():
        (pkg / name).symlink_to(ROOT / folder)
    sys.path.insert(0, str(tmp))
