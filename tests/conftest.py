"""Session fixtures shared across test modules: built once per run, read-only for every test
(a test that changes a checkpoint or a store copies it first).

    tiny_dsv3        the tiny random DeepSeek-V3 + MTP (``make_dsv3``, seed 0)
    tiny_dsv4        the tiny random DeepSeek-V4 + MTP (``make_dsv4``, seed 0)
    tiny_dsv4_base   tiny_dsv4 re-saved as an indexed two-shard base without its MTP layer
    dsv4_capture     requant.testing.stores.capture_dsv4 of tiny_dsv4 (12 prompts, hf engine)
    prompts_parquet  64 synthetic prompts in the ultrachat schema
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_dsv3(tmp_path_factory):
    from requant.hooks.fixtures import make_dsv3

    return make_dsv3(tmp_path_factory.mktemp("tiny-dsv3") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_dsv4(tmp_path_factory):
    from requant.hooks.fixtures import make_dsv4

    return make_dsv4(tmp_path_factory.mktemp("tiny-dsv4") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_dsv4_base(tiny_dsv4, tmp_path_factory):
    from requant.testing.base import make_base

    return make_base(tiny_dsv4, tmp_path_factory.mktemp("tiny-dsv4-base") / "base")


@pytest.fixture(scope="session")
def dsv4_capture(tiny_dsv4, tmp_path_factory) -> str:
    from requant.testing.stores import capture_dsv4

    return capture_dsv4(tiny_dsv4, str(tmp_path_factory.mktemp("dsv4-capture") / "cap"))


@pytest.fixture(scope="session")
def prompts_parquet(tmp_path_factory):
    from requant.orchestrator.prompts import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("data") / "prompts.parquet", 64, seed=1)
