"""Shared test inputs (repo folder ``tests/support``): builders of checkpoints, stores and data
that the tests, the demos and the benchmarks use; the pytest session fixtures over them live in
``tests/conftest.py``. Nothing here imports pytest.

    base.py       make_base: a model re-saved as an indexed, sharded base checkpoint (MTP layer dropped)
    synthetic.py  MoE calibration data that looks like real activations (quantize-demo, benchmarks)
    stores.py     build_store: capture stores of the tiny DSV4's row width, written by the real writer
    jobs.py       driving ``requant capture-job`` as a subprocess: config, start, status, waits, kill
    vllm_meta.py  vLLM's DeepSeek-V4 module trees built on the meta device on a CUDA-less machine

The tiny checkpoints themselves are ``requant.hooks.fixtures`` (``requant fixture``)."""
