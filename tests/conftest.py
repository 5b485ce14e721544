import pytest
import torch

from tests.helpers import make_brain_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def brain_data(tmp_path_factory):
    return make_brain_dataset(tmp_path_factory.mktemp("brain"))
