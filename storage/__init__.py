"""requant.storage"""
