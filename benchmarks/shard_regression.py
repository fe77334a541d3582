"""Shard regression: this tree's quantize stage against an earlier commit's, same inputs, same
device. The inputs are quantize_stage.py's (FAKE DeepSeek-V4-Flash master and base, synthetic
store; ``--small``: its reduced shapes); the earlier stage runs in a subprocess from a plain
export of that commit (``git archive <commit> | tar -x -C DIR``). No held-out split here (the
earlier stage had none), so both calibrate on the same rows. Reports the two shards' sha256 and,
tensor by tensor, which are byte-identical, which differ (and how far, dequantised where packed)
and which exist in one only — so a changed sha256 is explained by name. Writes JSON.

    python3 benchmarks/shard_regression.py --old /tmp/old --out benchmarks/results/shard_regression_h200.json
    python3 benchmarks/shard_regression.py --old /tmp/old --small      # CPU smoke test
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
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

from requant.quantizer import QuantizeJob, run_quantize  # noqa: E402
from requant.quantizer.mtp.weights import dequant_fp8_block  # noqa: E402

SHARD = "model-mtp-w4a16.safetensors"

# Runs in a subprocess: `requant` mapped onto the earlier tree's folders ahead of anything installed.
OLD_DRIVER = """
import json, sys, tempfile
from pathlib import Path
old, what, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
pkg = Path(tempfile.mkdtemp(prefix="requant-old-")) / "requant"
pkg.mkdir()
for name in ("capture", "hooks", "storage", "orchestrator", "quantizer"):
    (pkg / name).symlink_to(Path(old).resolve() / name)
sys.path.insert(0, str(pkg.parent))
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # an installed requant
import torch
if what == "store":  # the earlier tree's store format, which this tree still reads
    sys.path.insert(1, str(Path(old).resolve() / "benchmarks"))
    from quantize_stage import dsv4_config, synthetic_store
    synthetic_store(Path(args["path"]), dsv4_config(args["small"]), args["rows"], args["seqs"],
                    torch.device("cuda" if torch.cuda.is_available() else "cpu"))
else:
    try:  # the quantizer's layout since the stage became a package
        from requant.quantizer.stage.run import QuantizeJob, run_quantize
    except ImportError:
        from requant.quantizer.stage import QuantizeJob, run_quantize
    run_quantize(QuantizeJob(**args), progress=False)
assert all(Path(m.__file__).resolve().is_relative_to(Path(old).resolve())
           for n, m in sys.modules.items() if n.startswith("requant.") and getattr(m, "__file__", None))
"""


def old_tree(old: str, what: str, **kw) -> None:
    subprocess.run([sys.executable, "-c", OLD_DRIVER, old, what, json.dumps(kw)], check=True)


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 26), b""):
            h.update(chunk)
    return h.hexdigest()


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="a plain export of the earlier commit's tree")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--rows", type=int, default=None, help="store rows (default 473,000; --small 4,096)")
    ap.add_argument("--replay", choices=["identity", "full"], default="identity")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = dsv4_config(args.small)
    rows = args.rows or (4096 if args.small else 473_000)
    scratch = Path(tempfile.mkdtemp(prefix="requant-shard-regression-"))
    try:
        master, base = fake_master(scratch / "master", c, dev, False), fake_base(scratch / "base", c, dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the fake master was drawn on the device: give it back
        store = str(scratch / "store")
        old_tree(args.old, "store", path=store, small=args.small, rows=rows, seqs=16 if args.small else 256)
        # the earlier tree first, in its own process: this process then holds no device memory of it
        t = time.perf_counter()
        old_tree(args.old, "quantize", stores=[store], master=str(master), base=str(base), out=str(scratch / "old"),
                 replay=args.replay)
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        run_quantize(QuantizeJob(stores=[store], master=str(master), base=str(base), out=str(scratch / "new"),
                                 replay=args.replay, holdout=0.0), progress=False)
        t_new = time.perf_counter() - t
        res = compare(scratch / "new" / SHARD, scratch / "old" / SHARD)
        res.update(sha256_new=sha256(scratch / "new" / SHARD), sha256_old=sha256(scratch / "old" / SHARD),
                   wall_new_s=t_new, wall_old_s=t_old, rows=rows, replay=args.replay, small=args.small,
                   device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                   commit=os.environ.get("REQUANT_COMMIT"), old=os.environ.get("REQUANT_OLD_COMMIT"),
                   date=time.strftime("%Y-%m-%d", time.gmtime()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"shard sha256 new {res['sha256_new'][:16]}… old {res['sha256_old'][:16]}… "
          f"({'equal' if res['sha256_new'] == res['sha256_old'] else 'different'}); tensors identical "
          f"{res['identical']}, differing {len(res['differ'])}, only in new {len(res['only_new'])}, "
          f"only in old {len(res['only_old'])}; stage wall new {t_new:.1f} s, old {t_old:.1f} s")
    for k, v in list(res["differ"].items())[:40]:
        print(f"  differs: {k} {v}")
    for k in res["only_new"][:20]:
        print(f"  only new: {k}")
    for k in res["only_old"][:20]:
        print(f"  only old: {k}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
