"""Shard regression: this tree's quantize stage against an earlier commit's, same inputs, same
device. The inputs are quantize_stage.py's (FAKE DeepSeek-V4-Flash master and base, synthetic
store; ``--small``: its reduced shapes); the earlier stage runs in a subprocess from a plain
export of that commit (``git archive <commit> | tar -x -C DIR``), this tree's in another, with
the same job (``--holdout 0`` against a tree without a held-out split, so both calibrate on the
same rows). Reports the two shards' sha256 and,
tensor by tensor, which are byte-identical, which differ (and how far, dequantised where packed)
and which exist in one only — so a changed sha256 is explained by name. Writes JSON.

``--inputs DIR``: real inputs instead (``fixture_inputs.py`` builds ``DIR/dsv4`` and ``DIR/dsv3``
from the test fixtures); each is quantised by both trees, replay identity and full with the
job's default held-out split, and the two outputs compared: every file's sha256 (the shard, the
base shards, config, index, plots) and the manifest and report minus timestamps, timings, pids,
measured memory, output paths and versions. Exits 1 when anything differs.

    python3 benchmarks/shard_regression.py --old /tmp/old --out benchmarks/results/shard_regression_h200.json
    python3 benchmarks/shard_regression.py --old /tmp/old --small      # CPU smoke test
    python3 benchmarks/shard_regression.py --old /tmp/old --inputs /work/fixture-inputs
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _path import ensure_requant  # noqa: E402

ensure_requant()
from quantize_stage import dsv4_config, fake_base, fake_master  # noqa: E402

from requant.quantizer.stage.provenance import file_sha256  # noqa: E402
from requant.quantizer.stage.run import MANIFEST  # noqa: E402
from requant.quantizer.mtp.weights import dequant_fp8_block  # noqa: E402

SHARD = "model-mtp-w4a16.safetensors"
ROOT = Path(__file__).resolve().parents[1]  # this tree

# Runs in a subprocess: `requant` mapped onto a tree's folders (the earlier one's; with --inputs this
# one's too) ahead of anything installed.
TREE_DRIVER = """
import json, sys, tempfile
from pathlib import Path
tree, what, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
pkg = Path(tempfile.mkdtemp(prefix="requant-tree-")) / "requant"
pkg.mkdir()
for name in ("capture", "hooks", "storage", "orchestrator", "quantizer"):
    (pkg / name).symlink_to(Path(tree).resolve() / name)
sys.path.insert(0, str(pkg.parent))
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # an installed requant
import torch
if what == "store":  # the earlier tree's store format, which this tree still reads
    sys.path.insert(1, str(Path(tree).resolve() / "benchmarks"))
    from quantize_stage import dsv4_config, synthetic_store
    synthetic_store(Path(args["path"]), dsv4_config(args["small"]), args["rows"], args["seqs"],
                    torch.device("cuda" if torch.cuda.is_available() else "cpu"))
else:
    try:  # the quantizer's layout since the stage became a package
        from requant.quantizer import QuantizeJob, run_quantize
    except ImportError:
        from requant.quantizer.stage import QuantizeJob, run_quantize
    run_quantize(QuantizeJob(**args), progress=False)
assert all(Path(m.__file__).resolve().is_relative_to(Path(tree).resolve())
           for n, m in sys.modules.items() if n.startswith("requant.") and getattr(m, "__file__", None))
"""


def in_tree(tree: str, what: str, **kw) -> None:
    subprocess.run([sys.executable, "-c", TREE_DRIVER, tree, what, json.dumps(kw)], check=True)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def compare(new: Path, old: Path) -> dict:
    with safe_open(str(new), "pt") as a, safe_open(str(old), "pt") as b:
        ka, kb = set(a.keys()), set(b.keys())
        same, differ = 0, {}
        for k in sorted(ka & kb):
            x, y = a.get_tensor(k), b.get_tensor(k)
            if x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bytes(x), _bytes(y)):
                same += 1
                continue
            info = {"new": [str(x.dtype), list(x.shape)], "old": [str(y.dtype), list(y.shape)]}
            scale = k.removesuffix(".weight") + ".scale"
            if y.dtype == torch.float8_e4m3fn and x.dtype == torch.bfloat16 and scale in kb - ka:
                # the earlier FP8 bytes, dequantised as assembly does: equal to what is written now?
                ref = dequant_fp8_block(y, b.get_tensor(scale)).to(torch.bfloat16)
                info["equals_old_dequantised"] = bool(torch.equal(x, ref))
            if x.shape == y.shape and x.dtype.is_floating_point and x.element_size() > 1 and y.element_size() > 1:
                info["max_abs_diff"] = float((x.float() - y.float()).abs().max())
            differ[k] = info
    return {"identical": same, "differ": differ, "only_new": sorted(ka - kb), "only_old": sorted(kb - ka)}


# Manifest keys whose values differ between any two runs (clocks, processes, measured memory,
# library versions); the outputs' own paths are replaced by "<out>".
VOLATILE = {"created_at", "versions", "timings", "seconds", "seconds_total", "pid", "replay_pids",
            "peak_memory_per_worker", "peak_per_worker"}


def _normalise(x, out: str):
    if isinstance(x, dict):
        return {k: _normalise(v, out) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [_normalise(v, out) for v in x]
    return x.replace(out, "<out>") if isinstance(x, str) else x


def _manifest(out: Path) -> dict:
    m = _normalise(json.loads((out / MANIFEST).read_text()), str(out))
    m["memory"].pop("workers")  # each step's measured peak
    return m


def _report(out: Path) -> list[str]:
    lines = (out / "report.md").read_text().replace(str(out), "<out>").splitlines()
    lines = [re.sub(r"; [0-9.]+ s\. ", "; _ s. ", line) for line in lines]
    cut = lines.index("## Timings")
    return lines[:cut] + [re.sub(r"\| [0-9.]+ \|$", "| _ |", line) for line in lines[cut:]]


def _first_difference(a, b, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                return _first_difference(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{where}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where or '.'}: new {str(a)[:200]} old {str(b)[:200]}"


def compare_outputs(new: Path, old: Path) -> dict:
    """Every file of the two output directories by sha256, the manifest and report normalised."""
    files = {p.name for p in new.iterdir()} | {p.name for p in old.iterdir()}
    differ = [f for f in sorted(files - {MANIFEST, "report.md"})
              if not ((new / f).exists() and (old / f).exists() and file_sha256(new / f) == file_sha256(old / f))]
    mn, mo = _manifest(new), _manifest(old)
    rn, ro = _report(new), _report(old)
    return {"shard_sha256_new": file_sha256(new / SHARD), "shard_sha256_old": file_sha256(old / SHARD),
            "files": len(files), "files_differ": differ,
            "manifest": "same" if json.dumps(mn) == json.dumps(mo) else "key order" if mn == mo else
            _first_difference(mn, mo),
            "report": "same" if rn == ro else next(f"line {i}: new {a!r} old {b!r}" for i, (a, b) in
                                                    enumerate(zip(rn + [""] * len(ro), ro + [""] * len(rn))) if a != b)}


def run_inputs(old: str, inputs: Path, replays: list[str], keep: bool, results: list | None = None) -> bool:
    """Both trees on each fixture of ``inputs`` (``fixture_inputs.py``), one line per run; this
    tree runs from the files beside this script (an export of a commit runs that commit)."""
    fixtures = sorted(p.parent for p in inputs.glob("*/job.json"))
    if not fixtures:
        raise SystemExit(f"{inputs}: no fixture inputs (build them: python3 benchmarks/fixture_inputs.py {inputs})")
    scratch = Path(tempfile.mkdtemp(prefix="requant-shard-regression-"))
    ok = True
    try:
        for fx in fixtures:
            for replay in replays:
                job = {"stores": [str(fx / "store")], "master": str(fx / "master"), "base": str(fx / "base"),
                       "replay": replay, **json.loads((fx / "job.json").read_text())}
                outs = {k: scratch / f"{fx.name}-{replay}-{k}" for k in ("old", "new")}
                walls = {}
                for k, tree in (("old", old), ("new", ROOT)):  # each in its own process, the same way
                    t = time.perf_counter()
                    in_tree(str(tree), "quantize", **job, out=str(outs[k]))
                    walls[k] = time.perf_counter() - t
                res = compare_outputs(outs["new"], outs["old"])
                same = (res["shard_sha256_new"] == res["shard_sha256_old"] and not res["files_differ"]
                        and res["manifest"] == res["report"] == "same")
                ok &= same
                if not same and res["shard_sha256_new"] != res["shard_sha256_old"]:
                    res["tensors"] = compare(outs["new"] / SHARD, outs["old"] / SHARD)
                    t = res["tensors"]
                    print(f"  tensors identical {t['identical']}, differing {len(t['differ'])} "
                          f"(first {list(t['differ'])[:3]}), only new {t['only_new'][:3]}, only old {t['only_old'][:3]}")
                if results is not None:
                    results.append({"fixture": fx.name, "replay": replay, "identical": same,
                                    "wall_new_s": walls["new"], "wall_old_s": walls["old"], **res})
                print(f"{fx.name} replay {replay}: {'IDENTICAL' if same else 'DIFFERENT'} — shard sha256 new "
                      f"{res['shard_sha256_new'][:16]} old {res['shard_sha256_old'][:16]}; {res['files']} files, "
                      f"differing {res['files_differ'] or 'none'}; manifest {res['manifest']}; report "
                      f"{res['report']}; wall new {walls['new']:.1f} s, old {walls['old']:.1f} s", flush=True)
    finally:
        if keep:
            print(f"outputs kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="a plain export of the earlier commit's tree")
    ap.add_argument("--inputs", default=None, help="fixture inputs (fixture_inputs.py) instead of synthetic ones")
    ap.add_argument("--replays", default="identity,full", help="with --inputs: the replays to run")
    ap.add_argument("--keep", action="store_true", help="with --inputs: keep the outputs")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--rows", type=int, default=None, help="store rows (default 473,000; --small 4,096)")
    ap.add_argument("--replay", choices=["identity", "full"], default="identity")
    ap.add_argument("--holdout", type=float, default=None,
                    help="held-out fraction for both trees (default: each tree's own; 0 against a tree without one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.inputs:
        sys.exit(0 if run_inputs(args.old, Path(args.inputs), args.replays.split(","), args.keep) else 1)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = dsv4_config(args.small)
    rows = args.rows or (4096 if args.small else 473_000)
    scratch = Path(tempfile.mkdtemp(prefix="requant-shard-regression-"))
    results: list = []
    try:
        fx = scratch / "synthetic"
        fake_master(fx / "master", c, dev, False), fake_base(fx / "base", c, dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the fake master was drawn on the device: give it back
        in_tree(args.old, "store", path=str(fx / "store"), small=args.small, rows=rows, seqs=16 if args.small else 256)
        # both trees with the same job (each tree's own defaults for what is not given), each in its own process
        (fx / "job.json").write_text(json.dumps({} if args.holdout is None else {"holdout": args.holdout}))
        ok = run_inputs(args.old, scratch, [args.replay], keep=False, results=results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res = results[0]
    res.update(rows=rows, small=args.small, device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
               commit=os.environ.get("REQUANT_COMMIT"), old=os.environ.get("REQUANT_OLD_COMMIT"),
               date=time.strftime("%Y-%m-%d", time.gmtime()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
