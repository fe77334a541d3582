"""A base checkpoint for tests and demos: a model's tensors re-saved as an indexed,
sharded safetensors checkpoint without its MTP layer — what a quantiser that drops
``mtp.*`` (llm-compressor #1630/#2735) leaves behind, and what the quantize stage's
MTP shard plugs back into; and the check of an assembled checkpoint's union index."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from requant.quantizer.mtp.arch import load_spec


def make_base(src: str | Path, out: str | Path, shards: int = 2, drop_mtp: bool = True,
              quantization_config: dict | None = None) -> Path:
    """``src``: a checkpoint directory with ``model.safetensors`` and ``config.json``."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=False)
    config = json.loads((src / "config.json").read_text())
    prefix = load_spec(config).prefix
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    names = sorted(n for n in tensors if not (drop_mtp and n.startswith(prefix)))
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * len(names) // shards:(i + 1) * len(names) // shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(out / fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name != "config.json":
            shutil.copy2(p, out / p.name)
    return out


def checked_weight_map(out: str | Path) -> dict[str, str]:
    """The weight map of checkpoint ``out``'s index, checked to list every tensor of every file it
    names exactly once (an AssertionError otherwise)."""
    out = Path(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    seen = []
    for fname in sorted(set(index.values())):
        with safe_open(str(out / fname), "pt") as f:
            seen += list(f.keys())
    assert sorted(seen) == sorted(index) and len(seen) == len(set(seen)), out
    return index
