"""The checkpoints the quantize stage reads, damaged one file at a time: the master (indexed,
two shards) and the base — config.json unparsable or with wrong types, an index cut, emptied,
naming a missing shard or another checkpoint's, shards cut in half, emptied, deleted, their
safetensors header or its length field flipped, or swapped for the other checkpoint's.
``requant quantize`` must end in a clear error naming the file (and leave nothing behind)
or reproduce the undamaged shard exactly. The table prints with ``-s``."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import zlib
from pathlib import Path

from .harness import Matrix, clear_error, cli, empty, delete, flip, no_partial_output, replace, truncate

INDEX = "model.safetensors.index.json"


def _edit_json(fn):
    def damage(path: Path, other: Path | None, case: str) -> bool:
        path.write_text(json.dumps(fn(json.loads(path.read_text()))))
        return True
    return damage


def _header_flip(path: Path, other: Path | None, case: str) -> bool:
    """A flipped byte inside the safetensors JSON header (seeded, as harness.flip)."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    r = random.Random(zlib.crc32(case.encode()))
    data[8 + r.randrange(n)] ^= r.randrange(1, 256)
    path.write_bytes(bytes(data))
    return True


def _length_flip(path: Path, other: Path | None, case: str) -> bool:
    """The header-length field (first 8 bytes) off by one bit."""
    data = bytearray(path.read_bytes())
    data[1] ^= 0x04
    path.write_bytes(bytes(data))
    return True


def _missing_shard(index: dict) -> dict:
    wm = index["weight_map"]
    first = sorted(wm)[0]
    return dict(index, weight_map=dict(wm, **{first: "model-00003-of-00002.safetensors"}))


JSON_DAMAGES = {"flip": flip, "truncate": truncate, "empty": empty, "delete": delete, "replace": replace}
CONFIG_DAMAGES = {
    "str hidden_size": _edit_json(lambda c: dict(c, hidden_size=str(c["hidden_size"]))),
    "float n_routed_experts": _edit_json(lambda c: dict(c, n_routed_experts=c["n_routed_experts"] + 0.5)),
    "null num_hidden_layers": _edit_json(lambda c: dict(c, num_hidden_layers=None)),
    "list, not object": _edit_json(lambda c: [c]),
}
BASE_CONFIG_DAMAGES = {"str quantization_config": _edit_json(lambda c: dict(c, quantization_config="w4a16"))}
INDEX_DAMAGES = {"missing shard": _edit_json(_missing_shard)}
SHARD_DAMAGES = {"truncate": truncate, "empty": empty, "delete": delete, "header flip": _header_flip,
                 "length flip": _length_flip, "replace": replace}


def _mtp_shard(ckpt: Path) -> str:
    wm = json.loads((ckpt / INDEX).read_text())["weight_map"]
    return wm["mtp.0.ffn.experts.0.w1.weight"]


def _kinds(ck: dict, dsv3_config: Path) -> list:
    """(label, checkpoint, file, the other checkpoint's file for 'replace', damages)."""
    m, b = ck["sharded_master"], ck["base"]
    mtp = _mtp_shard(m)
    other = next(f for f in sorted(set(json.loads((m / INDEX).read_text())["weight_map"].values())) if f != mtp)
    return [
        ("master config.json", "sharded_master", "config.json", dsv3_config, JSON_DAMAGES | CONFIG_DAMAGES),
        ("master index", "sharded_master", INDEX, b / INDEX, JSON_DAMAGES | INDEX_DAMAGES),
        ("master shard with the MTP layer", "sharded_master", mtp, b / mtp, SHARD_DAMAGES),
        ("master shard without it", "sharded_master", other, b / other, SHARD_DAMAGES),
        ("base config.json", "base", "config.json", dsv3_config, JSON_DAMAGES | CONFIG_DAMAGES | BASE_CONFIG_DAMAGES),
        ("base index", "base", INDEX, m / INDEX, JSON_DAMAGES | INDEX_DAMAGES),
        ("base shard", "base", "model-00001-of-00002.safetensors", m / "model-00001-of-00002.safetensors",
         SHARD_DAMAGES),
    ]


def _linked_copy(src: Path, dst: Path, own: str | None) -> None:
    """``src`` as hard links (no gigabytes copied per case), ``own`` a real copy to damage."""
    dst.mkdir()
    for p in src.iterdir():
        (shutil.copyfile if p.name == own else os.link)(p, dst / p.name)


def _outputs(out: Path) -> dict:
    """What a quantize run publishes that must not depend on damage it tolerates (manifest,
    report and plots carry timings and input paths)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.suffix in (".safetensors", ".json") and p.name != "requant-manifest.json"}


def test_every_checkpoint_file_damaged(stores, checkpoint, quantized, tmp_path):
    from requant.hooks.fixtures import dsv3_config

    other_model = tmp_path / "dsv3-config.json"  # another model's config: DeepSeek-V3's
    other_model.write_text(json.dumps(dsv3_config(checkpoint["vocab"]), indent=2))
    want = _outputs(quantized["out"])
    m = Matrix("checkpoint faults (requant quantize)")
    for label, which, rel, other, damages in _kinds(checkpoint, other_model):
        for damage, fn in damages.items():
            case = tmp_path / f"{len(m.rows) + len(m.na):03d}"
            case.mkdir()
            ck = {k: case / k for k in ("sharded_master", "base")}
            for k, path in ck.items():
                _linked_copy(checkpoint[k], path, rel if k == which else None)
            if not fn(ck[which] / rel, other, f"{which}/{rel}:{damage}"):
                m.na.append(f"{label}:{damage}")
                continue
            out = case / "out"
            r = cli("quantize", "--store", str(stores["a"]), "--master", str(ck["sharded_master"]),
                    "--base", str(ck["base"]), "--out", str(out), "--no-ray", "--quiet", "--device", "cpu")
            if r.rc == 0:
                got = _outputs(out)
                m.add(label, damage, "quantize", "same" if got == want else "WRONG",
                      f"outputs differ: {sorted(k for k in want if got.get(k) != want[k])}")
                continue
            clean, why = no_partial_output(out)
            ok, note = clear_error(r, (str(ck[which]),), (rel, "config", "index", "shard"))
            m.add(label, damage, "quantize", "error" if ok and clean else "UNCLEAR" if clean else "WRONG",
                  note if clean else why)
    print("\n" + m.table())
    assert not m.failures(), "\n".join(m.failures())
