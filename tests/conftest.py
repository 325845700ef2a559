import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))  # examples/, benchmarks/


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny sizes: thread-pool overhead dominates (SDPA's CPU kernel is ~10x slower on 2 busy
    threads), so a module that asks for this runs on one thread; the setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="device for device-aware tests (tests/test_triton.py, tests/test_cuda.py); cuda skips without a GPU",
    )


def pytest_configure(config):
    """On CPU, Triton kernels run in its interpreter (tests/test_triton.py turns it on for its tests),
    and triton decides at import whether its own helpers are interpreted: import it now with the
    interpreter on, then restore the setting, so no other test runs kernels in the interpreter."""
    config.addinivalue_line("markers", "cpu_too: a test in tests/test_cuda.py that also runs without --device cuda")
    if config.getoption("--device") != "cpu" or "triton" in sys.modules:
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device from `--device` (cpu by default); skips the test when cuda is asked for but absent."""
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: CUDA is not available")
    return torch.device(name)
