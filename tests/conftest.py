import pytest


@pytest.fixture(scope="session")
def gpu():
    """The native wgpu-py device (lavapipe on CPU machines); skips when there is no adapter."""
    pytest.importorskip("wgpu")
    from realm_wasm.gpu.device import GPUUnavailable
    from realm_wasm.gpu.native import NativeDevice

    try:
        yield NativeDevice.create()
    except GPUUnavailable as e:
        pytest.skip(str(e))


class LimitedDevice:
    """A device as a host with lower limits would show it (the same GPU underneath)."""

    def __init__(self, device, limits: dict[str, int]) -> None:
        self._device = device
        self.limits = {**device.limits, **limits}

    def __getattr__(self, name: str):
        return getattr(self._device, name)


@pytest.fixture(scope="session")
def limited_gpu(gpu):
    """limited_gpu(max_storage_buffer_binding_size=N): the test device with those limits lowered."""
    return lambda **limits: LimitedDevice(gpu, limits)
