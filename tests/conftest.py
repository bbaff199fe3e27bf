import pathlib
import sys

# tests import their helpers module directly
sys.path.insert(0, str(pathlib.Path(__file__).parent))


def pytest_configure(config):
    # pytest-xdist's marker, declared for runs without the plugin (see test_triton_static.py)
    config.addinivalue_line("markers", "xdist_group(name): run these tests on one pytest-xdist worker")
