"""The scripts of tools/ as modules, for tests that call their functions."""
import importlib.util
import os.path as osp


def load_script(path):
    """The script at ``path`` run as a new module (a fresh copy per call, so
    a test can monkeypatch its copy without touching another test's)."""
    name = osp.splitext(osp.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
