import pytest


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the runtime tests, bound to loopback, shut down at the end."""
    from engine.runtime.cluster import start_ray, stop_ray

    start_ray(num_cpus=2)
    yield
    stop_ray()
