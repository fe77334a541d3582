"""enforce_eager of capture jobs (auto | true | false): one field for YAML, the API and the
CLI; the flag each replica's vLLM gets; and auto's fall-back — a replica whose capture
plugin refuses the point with compilation on (a model tree vLLM torch.compiles) is started
again eager, and so is every later replica."""
import asyncio
import sys
from pathlib import Path

import pytest
import yaml

from requant.orchestrator.replica import ReplicaServer, ReplicaSpec, server_command
from requant.orchestrator.spec import CaptureSpec, load_capture_spec

STANDIN = Path(__file__).with_name("_standin_dsv4_server.py")
SPEC = ["--speculative-config", '{"method":"mtp","num_speculative_tokens":1}']


def test_enforce_eager_setting(tmp_path):
    def spec(**fields):
        (tmp_path / "job.yaml").write_text(yaml.safe_dump({"model": "m", "store": "s", **fields}))
        return load_capture_spec(tmp_path / "job.yaml")

    assert spec().enforce_eager == "auto" and spec().starts_eager() is False  # target_pre_head: compiled
    assert spec(enforce_eager=True).starts_eager() is True
    assert spec(enforce_eager=False).enforce_eager is False
    # read in the drafter: eager on every tree (hooks.points.needs_eager)
    assert spec(point="mtp_input", vllm_args=SPEC).starts_eager() is True
    for bad, needle in (({"enforce_eager": "maybe"}, "enforce_eager"),
                        ({"vllm_args": ["--enforce-eager"]}, "set enforce_eager"),
                        ({"point": "mtp_input", "enforce_eager": False, "vllm_args": SPEC},
                         "enforce_eager must be auto or true")):
        with pytest.raises(ValueError, match=needle):
            spec(**bad)
    rs = ReplicaSpec(model="m", store="s", writer="w")
    assert "--enforce-eager" not in server_command(rs, 1)
    assert "--enforce-eager" in server_command(ReplicaSpec(model="m", store="s", writer="w", enforce_eager=True), 1)


@pytest.fixture
def ray_local(tmp_path_factory):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


def _start_one(tmp_path, ray, enforce_eager):
    """One replica of a job's pool, started with its vLLM server replaced by the stand-in."""
    from requant.orchestrator.pool import Replica, ReplicaPool, Stats

    class StandInReplica(ReplicaServer):
        def command(self, port):
            return [sys.executable, str(STANDIN), *server_command(self.spec, port)[3:]]

    spec = CaptureSpec(model=str(tmp_path / "m"), store=str(tmp_path / "cap"), enforce_eager=enforce_eager,
                       health_timeout_s=60)
    pool = ReplicaPool(spec, Stats(enforce_eager=spec.starts_eager()), "test")
    pool.actor_cls = lambda: ray.remote(num_cpus=0)(StandInReplica)
    pool.replicas = [Replica(0)]

    async def run():
        try:
            await pool.start(pool.replicas[0])
        finally:
            await pool.stop_all()
    asyncio.run(run())
    return pool


def test_auto_restarts_a_replica_eager_when_the_plugin_refuses_compiled(tmp_path, ray_local):
    from requant.orchestrator.pool import JobError

    pool = _start_one(tmp_path, ray_local, "auto")
    r = pool.replicas[0]
    assert r.eager and r.incarnation == 2 and r.url  # refused compiled, healthy eager
    assert pool.stats.enforce_eager and "HCHeadOp" in pool.stats.eager_reason
    with pytest.raises(JobError, match="enforce_eager is False; auto or true lets the job start it eager"):
        _start_one(tmp_path, ray_local, False)
