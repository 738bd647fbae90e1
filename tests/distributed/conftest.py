"""A local Ray cluster per test module, for the expert-parallel groups' rank actors."""

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """More logical CPUs than the box has cores: each rank reserves one and runs one torch
    thread, and idle ranks cost nothing. Shut down at the module's end if started here."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            num_cpus=12,
            include_dashboard=False,
            logging_level="warning",
            log_to_driver=False,
        )
    yield
    if started:
        ray.shutdown()
