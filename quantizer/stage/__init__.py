"""requant.quantizer.stage: the quantize stage — replay of capture stores, partitions/held-out split, distribution over workers, shard assembly, report, ``run_quantize``."""
