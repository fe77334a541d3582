"""Bad input to the capture job: clear errors, nothing started or half-written."""
import json
import subprocess
import sys

from requant.testing.jobs import job_config


def _run(cfg, *extra, timeout=300):
    return subprocess.run([sys.executable, "-m", "requant.orchestrator.cli", "capture-job", "--config", str(cfg),
                           "--no-progress", *extra], capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, tiny_dsv3, prompts_parquet):
    cfg = job_config(tmp_path / "job.yaml", model=str(tiny_dsv3), store=str(tmp_path / "cap"), replicas=3,
                     prompts={"source": str(prompts_parquet), "count": 5})
    r = _run(cfg, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "to_send           5" in r.stdout and "replicas          3" in r.stdout
    assert "enforce_eager     True" in r.stdout
    r = _run(cfg, "--dry-run", "--enforce-eager", "auto")  # target_pre_head: compiled
    assert r.returncode == 0 and "enforce_eager     auto (starts compiled)" in r.stdout, r.stderr
    assert not (tmp_path / "cap").exists()


def test_unreachable_ray_address(tmp_path, tiny_dsv3, prompts_parquet):
    cfg = job_config(tmp_path / "job.yaml", model=str(tiny_dsv3), store=str(tmp_path / "cap"),
                     ray_address="127.0.0.1:9", prompts={"source": str(prompts_parquet), "count": 2})
    r = _run(cfg, timeout=60)
    assert r.returncode == 2 and "cannot reach the Ray cluster at '127.0.0.1:9'" in r.stderr, r.stderr[-2000:]


def test_missing_columns_and_zero_prompts(tmp_path, tiny_dsv3):
    for name, record, needle in (("bad", {"text": "x"}, "expected columns 'prompt' and/or 'messages'"),
                                 ("empty", {"prompt": " "}, "zero prompts after filtering")):
        src = tmp_path / f"{name}.jsonl"
        src.write_text(json.dumps(record) + "\n")
        cfg = job_config(tmp_path / "job.yaml", model=str(tiny_dsv3), store=str(tmp_path / "cap"),
                         prompts={"source": str(src)})
        r = _run(cfg)
        assert r.returncode == 2 and needle in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "cap").exists() and not (tmp_path / "cap.ledger.jsonl").exists()


def test_replica_that_never_becomes_healthy(tmp_path, prompts_parquet):
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["NoSuchModel"], "model_type": "nope"}))
    cfg = job_config(tmp_path / "job.yaml", model=str(model), store=str(tmp_path / "cap"),
                     prompts={"source": str(prompts_parquet), "count": 2}, health_timeout_s=200)
    r = _run(cfg)
    assert r.returncode == 2 and "replica 0 exited with code" in r.stderr and "log tail" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "cap").exists()  # nothing captured, no store
