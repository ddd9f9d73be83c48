import os

import pytest
import torch

# Two cores, shared: one thread keeps torch.linalg.solve_triangular fast and runs repeatable.
torch.set_num_threads(int(os.environ.get("NEXTSERVE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def hf_next_dir(tmp_path_factory):
    from tests.hf_models import save_hf_model

    return save_hf_model("qwen3_next", tmp_path_factory.mktemp("hf_next"))


@pytest.fixture(scope="session")
def hf_moe_dir(tmp_path_factory):
    from tests.hf_models import save_hf_model

    return save_hf_model("qwen3_moe", tmp_path_factory.mktemp("hf_moe"))


@pytest.fixture(scope="session", params=["qwen3_next", "qwen3_moe"])
def hf_dir(request, hf_next_dir, hf_moe_dir):
    return hf_next_dir if request.param == "qwen3_next" else hf_moe_dir


_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process with pytest's verdict once it is reported, skipping the interpreter's own
    teardown: in one whole-suite run (ruff, 528 tests, all reported) that teardown of native
    threads (Ray's core worker, torch's) died of SIGSEGV after the last test, turning a verdict
    into exit code 139. Ray is shut down first, as its exit hook would. Set
    NEXTSERVE_TEST_FULL_TEARDOWN=1 to run the full teardown (under faulthandler) and look into it."""
    if not _exit_status:
        return
    import faulthandler
    import sys

    faulthandler.enable()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if os.environ.get("NEXTSERVE_TEST_FULL_TEARDOWN") == "1":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status[-1])
