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
