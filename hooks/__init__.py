"""requant.hooks — where MTP-layer inputs are read, and the engines that read them.

    points.py     CapturePoint / TensorRef declarations per engine × architecture; find_point, resolve
    attach.py     attach(point, model, on_rows, width): installs a point's torch hooks
    plugin.py     the vLLM general plugin (entry point vllm.general_plugins; REQUANT_CAPTURE=<store>)
    hf_engine.py  capture_hf(HFCaptureConfig, prompts): the same points driven by transformers' generate
    fixtures.py   make_dsv3 / make_dsv4: tiny deterministic checkpoints (`requant fixture dsv3|dsv4 OUT`)
"""
