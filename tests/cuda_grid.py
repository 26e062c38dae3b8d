"""What the CUDA kernel tests share: the grid of dtypes, head dims and lengths,
the error slack, random inputs, the NaN poisoning of every kernel output, and the
choice of forward kernel on a Hopper GPU."""

import pytest
import torch

import flash_ext

DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [32, 64, 96, 128, 160, 192, 224, 256]
# (Nq, Nk): awkward lengths, tiles that do not divide them, Nq != Nk both ways.
LENGTHS = [(1, 1), (17, 17), (113, 113), (127, 127), (128, 128), (129, 129), (1000, 1000),
           (4097, 4097), (113, 1000), (1000, 113), (1, 4097), (4097, 17)]
ABS_SLACK = 1e-4


def over_grid(test):
    """Parametrize a test over the whole grid: dtype, d (head dim), causal and (nq, nk)."""
    for mark in reversed([pytest.mark.parametrize("dtype", DTYPES, ids=str), pytest.mark.parametrize("d", HEAD_DIMS),
                          pytest.mark.parametrize("causal", [False, True]), pytest.mark.parametrize("nq,nk", LENGTHS)]):
        test = mark(test)
    return test


def grid_batch_heads(nq, nk):
    """Batch and heads of a grid case: fewer for the longest rows."""
    return (1, 2) if max(nq, nk) > 1000 else (2, 3)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every output is NaN-filled before the kernels run: an unwritten element fails.
    Autouse in each test module that imports it."""
    if flash_ext.interface._C is not None:
        flash_ext.interface._C.set_poison_outputs(True)
    yield
    if flash_ext.interface._C is not None:
        flash_ext.interface._C.set_poison_outputs(False)


# On a Hopper GPU the forward runs the sm_90a kernel at these head dims (with its softmax
# overlap); tests also run it without the overlap and run the sm_80 kernel there, so that
# neither goes untested.
_C = flash_ext.interface._C
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
SM90_HEAD_DIMS = [64, 128, 256]
on_hopper_with_sm90 = pytest.mark.skipif(not (HOPPER and _C is not None and _C.built_sm90()),
                                         reason="needs a Hopper GPU and the sm_90a forward built")


@pytest.fixture
def forward_kernel(request):
    """Sets (force_sm80, sm90_overlap) for one test, and restores the defaults after it.
    Request it indirectly, with the pair as its parameter."""
    force_sm80, overlap = request.param
    _C.set_force_sm80(force_sm80)
    _C.set_sm90_overlap(overlap)
    yield
    _C.set_force_sm80(False)
    _C.set_sm90_overlap(True)


def rand(*shape, dtype, gen):
    """Standard normal values drawn in float32 on the GPU, then cast."""
    return torch.randn(*shape, dtype=torch.float32, device="cuda", generator=gen).to(dtype)
