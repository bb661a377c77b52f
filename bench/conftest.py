"""pytest configuration of ``pytest bench/``: GPU cases skip without CUDA; ``--benchmark-json`` gets the stamp."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    # bench/test_smoke.py's marker; bench.watchdog (gpu_run.sh loads it) enforces it.
    config.addinivalue_line("markers", "case_timeout(seconds): this test's own time limit under bench.watchdog")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # without the plugin its hook would be rejected as unknown
    pass
else:
    def pytest_benchmark_update_machine_info(config, machine_info):
        from bench.report import stamp

        machine_info["rnnfast"] = stamp("cuda" if torch.cuda.is_available() else "cpu")
