"""requant.orchestrator"""
