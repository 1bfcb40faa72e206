"""CPU and CUDA twins share one vocabulary: each stage the host backend runs has a GPU twin
of the same name in the parallel file (except the host-only ``apply`` of Dask's tasks, and
``cpu/ghost.py``'s ghost batches, which the GPU runs as one call per ghost)."""

import importlib

import pytest

HOST_ONLY = {"apply"}


@pytest.mark.parametrize("stage", ["stats", "forward", "backward", "masked", "activation"])
def test_drivers_share_names(stage):
    cpu = importlib.import_module(f"numbabn.cpu.{stage}")
    cuda = importlib.import_module(f"numbabn.cuda.{stage}")
    for module in (cpu, cuda):
        missing = [name for name in module.DRIVERS if not callable(getattr(module, name, None))]
        assert not missing, f"{module.__name__} lists drivers it lacks: {missing}"
    assert set(cpu.DRIVERS) - HOST_ONLY == set(cuda.DRIVERS)


def test_host_only_stages_exist():
    from numbabn.cpu import ghost

    missing = [name for name in ghost.DRIVERS if not callable(getattr(ghost, name, None))]
    assert not missing, f"numbabn.cpu.ghost lists drivers it lacks: {missing}"
