"""Ray for the tests that start it (tests/cluster): one way to start or join a cluster whose
workers import this checkout, as a module fixture (`ray_session_fixture`), a context manager
(`local_ray`) or a plain call (`init_ray`, for a ray.cluster_utils.Cluster's address). Only the
logical CPUs differ between modules: enough for their actors' placement groups, whatever the
machine has. Every test that starts Ray runs in a loopback-only network namespace."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = str(Path(__file__).resolve().parents[1])

# Extra environment variables for the workers, or a function of pytest's tmp_path_factory giving them.
Env = dict[str, str] | Callable[[pytest.TempPathFactory], dict[str, str]] | None


def init_ray(num_cpus: int | None = None, address: str = "local", env: dict[str, str] | None = None) -> None:
    """ray.init whose workers import this checkout (PYTHONPATH) and get `env`: `address` "local"
    starts a cluster of `num_cpus` logical CPUs here, without the dashboard; another address
    joins that cluster (a ray.cluster_utils.Cluster's, whose nodes set their own CPUs)."""
    import ray

    runtime_env = {"env_vars": {"PYTHONPATH": ROOT, **(env or {})}}
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env=runtime_env)
    else:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)


@contextmanager
def local_ray(num_cpus: int, env: dict[str, str] | None = None) -> Iterator[None]:
    """A local Ray cluster for the body (`init_ray`), shut down afterwards whatever happens."""
    import ray

    init_ray(num_cpus, env=env)
    try:
        yield
    finally:
        ray.shutdown()


def ray_session_fixture(num_cpus: int, env: Env = None, autouse: bool = True) -> Any:
    """A module-scoped fixture named `ray_session` holding a local Ray cluster (`local_ray`) for
    the module's tests: `ray_session = ray_session_fixture(16)` at module level."""

    @pytest.fixture(scope="module", autouse=autouse, name="ray_session")
    def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
        with local_ray(num_cpus, env(tmp_path_factory) if callable(env) else env):
            yield

    return ray_session
