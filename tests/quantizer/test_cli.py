"""The `requant quantize-demo` command end to end, as a newcomer runs it."""
import json
import subprocess
import sys

from safetensors.torch import load_file


def test_quantize_demo_prints_table_and_writes_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "requant.orchestrator.cli", "quantize-demo",
                          "--experts", "4", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "mtp.0.ffn.experts.3.w2" in out.stdout and "rtn_zero_tokens" in out.stdout
    records = json.loads((tmp_path / "records.json").read_text())
    assert len(records) == 12
    assert all(r["err_gptq"] < r["err_rtn"] for r in records if r["path"] == "gptq")
    tensors = load_file(str(tmp_path / "experts-w4a16.safetensors"))
    assert tensors["mtp.0.ffn.experts.0.w1.weight_packed"].shape == (256, 512 // 8)


def test_bad_group_size_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "requant.orchestrator.cli", "quantize-demo",
                          "--dim", "200"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "group size 128 does not divide the input dimension 200" in out.stderr
