"""requant.quantizer"""
