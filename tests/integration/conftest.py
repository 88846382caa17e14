from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import make_peft_adapter, make_tiny_model
from tests.servers import RunningControlPlane, RunningDataPlane


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    from tests.unit.engine_helpers import save_test_tokenizer

    path = make_tiny_model(tmp_path_factory.mktemp("base") / "tiny-llama", vocab_size=320)
    save_test_tokenizer(path, vocab_size=320)
    return path


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def good_adapter(base_model, adapter_root) -> Path:
    return make_peft_adapter(base_model, adapter_root / "good", r=8, alpha=16,
                             target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))


@pytest.fixture
def cp_factory(base_model, adapter_root, redis_url, redis_prefix, tmp_path):
    """Start control planes sharing this test's Redis prefix and data dir; all stopped at teardown."""
    from control_plane.config import ControlPlaneConfig

    started: list[RunningControlPlane] = []

    def start(**overrides) -> RunningControlPlane:
        settings = dict(base_model=str(base_model), listen="127.0.0.1:0", redis_url=redis_url,
                        redis_prefix=redis_prefix, data_dir=tmp_path / "cp", allowed_roots=(adapter_root,),
                        admin_token="test-admin-token", grace_period_s=1.0)
        settings.update(overrides)
        cp = RunningControlPlane(ControlPlaneConfig(**settings))
        started.append(cp)
        return cp

    yield start
    for cp in started:
        cp.stop()


@pytest.fixture
def cp(cp_factory) -> RunningControlPlane:
    return cp_factory()


@pytest.fixture
def dp_factory(base_model, redis_url, redis_prefix, tmp_path):
    """Start data planes on this test's Redis prefix; all stopped at teardown."""
    from data_plane.server.config import DataPlaneConfig

    started: list[RunningDataPlane] = []

    def start(control_plane: str, **overrides) -> RunningDataPlane:
        settings = dict(model=str(base_model), control_plane=control_plane, listen="127.0.0.1:0",
                        redis_url=redis_url, redis_prefix=redis_prefix, max_loras=2, max_cpu_loras=2,
                        max_lora_rank=16, max_model_len=128, max_num_seqs=8, device="cpu",
                        disk_cache_dir=tmp_path / f"dp{len(started)}-disk", grace_period_s=5.0, heartbeat_s=0.2,
                        fetch_timeout_s=5.0, fetch_retries=1, replica_id=f"dp-{len(started)}")
        settings.update(overrides)
        dp = RunningDataPlane(DataPlaneConfig(**settings))
        started.append(dp)
        return dp

    yield start
    for dp in started:
        dp.stop()
