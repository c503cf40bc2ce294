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
