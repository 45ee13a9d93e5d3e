import pytest
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| (0 when both are zero)."""
    denom = b.detach().norm()
    diff = (a.detach() - b.detach()).norm()
    return float(diff / denom) if denom > 0 else float(diff)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
