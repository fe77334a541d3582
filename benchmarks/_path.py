"""Make `import requant.*` work from a plain checkout (the GPU machine has no install):
maps requant.<component> onto the repo's top-level folders, as pyproject does."""
import importlib.util
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure_requant() -> None:
    if importlib.util.find_spec("requant") is not None:
        return
    tmp = Path(tempfile.mkdtemp(prefix="requant-path-"))
    pkg = tmp / "requant"
    pkg.mkdir()
    for name in ("capture", "hooks", "storage", "orchestrator", "quantizer"):
        (pkg / name).symlink_to(ROOT / name)
    sys.path.insert(0, str(tmp))
