"""benchmarks/quality_study.py's own logic, cheaply (its runs capture with vLLM and take minutes): the
prompt sets are disjoint as its docstring says, stored prompt ids map back to the prompts of a
capture, and per-tensor errors aggregate into the right coverage bins."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

from requant.hooks.trained import _held_out, load_heldout


@pytest.fixture(scope="module")
def qs():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "quality_study.py"
    spec = importlib.util.spec_from_file_location("quality_study", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_study"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_prompt_sets_are_disjoint_and_calibration_comes_from_trained_on_sources(qs):
    sets = qs.prompt_sets(n_cal=8, n_heldout=4, n_eval=4)
    assert {k: len(v) for k, v in sets.items()} == {"eval-code": 4, "eval-chat": 4, "heldout-code": 4,
                                                    "heldout-chat": 4, "calibration": 8}
    held = {k: {r["prompt_id"] for r in load_heldout(k)} for k in ("code", "chat")}
    for k in ("code", "chat"):
        for name in (f"eval-{k}", f"heldout-{k}"):
            assert {r["prompt_id"] for r in sets[name]} <= held[k]
    assert [r["kind"] for r in sets["calibration"]] == ["code", "chat"] * 4
    assert not any(_held_out(r["source"]) for r in sets["calibration"])  # files and topics it was trained on
    texts = [r["prompt"] for v in sets.values() for r in v]
    assert len(texts) == len(set(texts))
    again = qs.prompt_sets(n_cal=16, n_heldout=4, n_eval=4)  # a larger calibration set extends the smaller one
    assert again["calibration"][:8] == sets["calibration"] and again["eval-code"] == sets["eval-code"]


def test_stored_prompt_ids_name_the_request(qs):
    assert qs.request_index("12-88c95f34") == 12 and qs.request_index("hf-3") == 3 and qs.request_index("7") == 7
    with pytest.raises(ValueError, match="names no request index"):
        qs.request_index("rq~abc~q")


def test_errors_aggregate_by_coverage_bin(qs):
    rows = [{"T": 10, "D": 256, "code": 2.0, "chat": 1.0, "rtn_code": 1.0, "rtn_chat": 2.0},   # T/D 0.04
            {"T": 60, "D": 256, "code": 1.0, "chat": 1.0, "rtn_code": 2.0, "rtn_chat": 2.0},   # 0.23
            {"T": 300, "D": 128, "code": 1.0, "chat": None, "rtn_code": 2.0, "rtn_chat": 2.0}]  # 2.3, no chat error
    bins = qs.by_bins(rows)
    assert list(bins) == ["[0, 0.25)", "[2, 4)"]
    b = bins["[0, 0.25)"]
    assert b["tensors"] == 2 and b["err_code"] == 1.5 and b["rtn_code"] == 1.5 and b["ratio_to_rtn_code"] == 1.25
    assert b["ratio_to_rtn_chat"] == 0.5 and b["not_below_rtn_code"] == 0.5 and b["not_below_rtn_chat"] == 0.0
    assert bins["[2, 4)"] == {"tensors": 1} | {f"{s}_{k}": None for k in ("code", "chat")
                                                for s in ("err", "rtn", "ratio_to_rtn", "not_below_rtn")}
    assert qs.coverage_bin(256, 256) == "[1, 2)" and qs.coverage_bin(10 ** 6, 1) == f"[16, {math.inf:g})"
    assert qs.parse_sweep("4x4,256") == [(4, 4), (256, 1)]
