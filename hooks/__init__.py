"""requant.hooks"""
