"""requant.quantizer.stage: the quantize stage — capture stores + MTP master + base checkpoint →
a checkpoint with the W4A16 MTP shard, a manifest and a report (``run.run_quantize``).

In the order a run goes through them:

==================  =========================================================================
``job``             ``QuantizeJob``: what one run is asked to do
``run``             ``run_quantize``: check inputs → plan → dispatch → merge → publish
``provenance``      input hashes, capture-store identity, library versions
``partition``       calibration / held-out partitions of the stores, their share per worker
``distribute``      the distributed scheme, and its plan: phases, GPTQ batches, expert slices
``memory_plan``     each worker's estimated peak memory, and the limit it must fit
``driver``          the phases on a pool of workers; lost workers replaced
``local``           the pool in this process
``processes``       … as spawned processes on one host
``ray_actors``      … as Ray actors
``worker``          one rank: replay, reduce, GPTQ, held-out errors, measured peaks
``replay``          capture rows through the MTP block into per-expert Hessians
``wire``            the packed tensors' way back to the driver
``records``         what workers return, typed until the manifest is written
``assemble``        the output checkpoint: MTP shard contents, then every file
``base_files``      the base checkpoint: read, checked, placed; the union index
``quant_config``    the merged ``quantization_config`` and vLLM's view of it
``safetensors_io``  the deterministic safetensors writer
``manifest``        ``requant-manifest.json`` and the summary
``report``          ``report.md`` and its plots
==================  =========================================================================
"""
