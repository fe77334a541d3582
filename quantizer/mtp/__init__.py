"""requant.quantizer.mtp: the MTP architectures — config/architecture lookup, master weights, the DeepSeek-V3 and -V4 blocks, MoE output, offline draft acceptance."""
