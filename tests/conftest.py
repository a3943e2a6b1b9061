"""Shared test set-up: offline, stand-in ImageNet weights, small notebook settings, no windows."""
import os

os.environ.setdefault("LECTUREKIT_STANDIN", "1")
os.environ.setdefault("LECTUREKIT_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


@pytest.fixture(scope="session")
def course():
    """The bundled course model (read-only in tests: never train it in place)."""
    from lecturekit.models import course_model

    return course_model()


@pytest.fixture(scope="session")
def built_notebook(tmp_path_factory):
    """``build(path) -> record``: the lecture notebook executed (FAST, stand-ins) by the course build,
    once per test session, into a temporary build folder (``record["html"]``, ``record["ipynb"]``).

    tests/test_notebooks.py (it runs) and tests/test_built_course.py (its page reads well) share the
    execution. Under pytest-xdist, run with ``--dist loadgroup`` to keep both on one worker.
    """
    from lecturekit.course import build_notebook

    out = tmp_path_factory.mktemp("course")
    records: dict = {}

    def build(path):
        if path.stem not in records:
            record = build_notebook(path, out, fast=True, timeout=600, standin="1", heartbeat=60,
                                    log=lambda line: print(line, flush=True))
            record.update(html=out / f"{path.stem}.html", ipynb=out / f"{path.stem}.ipynb")
            records[path.stem] = record
        return records[path.stem]

    return build


@pytest.fixture(scope="session")
def shapes_batch():
    from lecturekit.data import shapes

    return shapes(16, seed=123)


def tiny_net(inplace: bool = True, seed: int = 0) -> nn.Module:
    """A small conv net with in-place ReLUs, for hook and gradient tests."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def model_state(model: nn.Module):
    """Everything contract 5 says must be left as found."""
    return dict(
        modes=[m.training for m in model.modules()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        grads=[p.grad for p in model.parameters()],
        hooks=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                  for m in model.modules()),
        forwards=[m.__dict__.get("forward") for m in model.modules()],
    )


def linear_model(H=6, W=6, K=3, seed=0):
    """S = W x + b: every gradient and every occlusion drop can be written down."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, K)).double()


_NO_CUDA = "no CUDA device here: the cuda variant runs unchanged on a machine with a GPU"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason=_NO_CUDA))])
def device(request) -> torch.device:
    """Every device available: cpu always, cuda where a GPU is present (skipped with a message otherwise)."""
    return torch.device(request.param)
