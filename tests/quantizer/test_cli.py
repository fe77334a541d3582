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


def test_quantize_options_are_the_job_fields():
    """`requant quantize` offers every QuantizeJob field but the internal ones, with the job's
    defaults; a bad value is refused before any work, naming its field."""
    from requant.orchestrator.cli import build_parser
    from requant.quantizer.cli import job_from_args
    from requant.quantizer.stage.job import INTERNAL, QuantizeJob

    parser = build_parser()
    required = ["quantize", "--store", "a", "--master", "m", "--base", "b", "--out", "o"]
    dests = {a.dest for a in parser._subparsers._group_actions[0].choices["quantize"]._actions}
    assert dests - {"help", "quiet"} == set(QuantizeJob.model_fields) - set(INTERNAL)
    assert job_from_args(parser.parse_args(required)) == QuantizeJob(stores=["a"], master="m", base="b", out="o")
    job = job_from_args(parser.parse_args(required + ["--store", "c", "--gpus", "2", "--no-ray", "--processes",
                                                      "--max-memory-gib", "0.5", "--low-tokens", "damp"]))
    assert (job.stores, job.workers, job.use_ray, job.processes, job.max_bytes, job.low_tokens) == \
        (["a", "c"], 2, False, True, 1 << 29, "damp")


def test_bad_quantize_option_names_its_field(tmp_path, capsys):
    from requant.orchestrator.cli import main

    assert main(["quantize", "--store", "a", "--master", "m", "--base", "b", "--out", str(tmp_path / "o"),
                 "--holdout", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "1 validation error" in err and "holdout must be in [0, 1), got 1.5" in err
    assert not (tmp_path / "o").exists()
