"""requant.hooks — where MTP-layer inputs are read, and the engines that read them.

    points.py     CapturePoint / TensorRef declarations per engine × architecture × vLLM model tree;
                  find_point, resolve, resolve_hidden; needs_eager (points read in vLLM's drafter)
    attach.py     attach(point, model, on_rows, width[, boundary]): installs a point's hooks (module,
                  function-level); with boundary, rows are emitted after the forward (Attachment.after_forward)
    plugin.py     the vLLM general plugin (entry point vllm.general_plugins; REQUANT_CAPTURE=<store>)
    hf_engine.py  capture_hf(HFCaptureConfig, prompts): the same points driven by transformers' generate
    fixtures.py   make_dsv3 / make_dsv4: tiny deterministic checkpoints (`requant fixture dsv3|dsv4 OUT`)
"""
