"""Every benchmark module imports: benches are not run by the suite, so this catches API drift."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import bench

MODULES = sorted(m.name for m in pkgutil.iter_modules(bench.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_bench_module_imports(name):
    importlib.import_module(f"bench.{name}")


def test_engine_cpu_reports_the_spread_of_pair_ratios():
    from types import SimpleNamespace

    from bench.engine_cpu import pair_ratios

    runs = lambda *walls: [(SimpleNamespace(wall=w), []) for w in walls]  # noqa: E731
    # base/mixed per pair: 0.8, 0.9, 0.5 -> median 0.8, range 0.5-0.9
    assert pair_ratios(runs(1.0, 1.0, 2.0), runs(0.8, 0.9, 1.0)) == "median 0.80, range 0.50-0.90"
