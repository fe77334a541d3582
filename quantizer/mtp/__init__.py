"""requant.quantizer.mtp: the MTP architectures (imports ``core``, never ``stage``).

* ``arch`` — ``checkpoint_config`` (config.json beside a checkpoint, checked) → ``load_spec`` →
  ``MTPSpec`` (prefix, shapes, expert names, the unquantised linears); ``load_block``: the
  architecture's block with the master's weights; ``read_tensor``, ``load_embedding``.
* ``weights`` — the checkpoint's files (``tensor_files``: safetensors headers checked, the index
  against its shards), ``load_mtp_weights``: the MTP tensors dequantised to bf16 (FP8 block scales
  under every naming, MXFP4 experts), the DSpark refusal.
* ``common`` — what both blocks share: ``MTPBlock`` (the constructor shape, ``moe_inputs``,
  ``expert_weights``), RMSNorm, interleaved RoPE, the row and sequence checks, the gate's scores
  and top-k tail.
* ``dsv3`` — the DeepSeek-V3/R1 block (MLA attention, YaRN, group-limited noaux_tc routing).
* ``dsv4`` — the DeepSeek-V4 block (mHC streams, sliding-window MQA with sinks, sqrtsoftplus gate).
* ``moe`` — the routed and shared experts' output, for the drafts' logits.
"""
