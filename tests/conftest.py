import os
import warnings

import pytest
import torch

# The cores are shared among pytest-xdist's workers (`-n auto`): each worker, and what it starts, gets its share.
_THREADS = max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
               // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run(model, zm):
    with torch.no_grad():
        return model(*zm.example_inputs, **zm.example_kwargs)


def first_tensor(out):
    """The main tensor of a model output: a tensor, a tuple's first, a ModelOutput's first field."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    return first_tensor(out.to_tuple() if hasattr(out, "to_tuple") else out[0])
