"""requant.capture"""
