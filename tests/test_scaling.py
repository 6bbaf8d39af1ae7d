"""benchmarks/scaling.py --quick, run in-process: every sweep point for both sides, and times, FLOPs
and shares of peak that make sense."""

from __future__ import annotations

import importlib.util
import json
from collections import defaultdict

import pytest

from benchmarks import scaling
from benchmarks.sides import SIDES

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The --quick run's JSON (and its plot, where matplotlib is installed), made once for the tests below."""
    out = tmp_path_factory.mktemp("scaling")
    argv = ["--quick", "--json", str(out / "scaling.json")] + (["--plot", str(out / "scaling.png")] if HAS_MATPLOTLIB else [])
    scaling.main(argv)
    return {"json": json.loads((out / "scaling.json").read_text()), "png": out / "scaling.png"}


def test_every_sweep_point_for_both_sides(report):
    rows = report["json"]["rows"]
    got = [(r["sweep"], r["value"], r["workload"], r["side"]) for r in rows]
    want = {(sweep, v, w, side) for sweep, values in scaling.QUICK_PLAN.sweeps.items()
            for v in values for w in scaling.WORKLOADS for side in SIDES}
    assert sorted(got) == sorted(want)  # nothing missing, nothing twice


def test_times_flops_and_shares(report):
    pairs = defaultdict(dict)
    for r in report["json"]["rows"]:
        assert r["seconds_per_image"] > 0, r
        assert 0 < r["peak_share"] <= 1.5, r
        pairs[r["sweep"], r["value"], r["workload"]][r["side"]] = r["gflop_per_image"]
    for key, flops in pairs.items():
        # The same architecture on both sides: the same work, counted alike.
        assert flops["ours"] == pytest.approx(flops["diffusers"], rel=0.01), key
        assert flops["ours"] > 0, key


def test_larger_points_cost_more_flops(report):
    """FLOPs per image grow with the latent and the width, and do not depend on the batch."""
    ours = {(r["sweep"], r["value"], r["workload"]): r["gflop_per_image"] for r in report["json"]["rows"] if r["side"] == "ours"}
    for workload in scaling.WORKLOADS:
        for sweep in ("latent", "width"):
            small, large = scaling.QUICK_PLAN.sweeps[sweep][:2]
            assert ours[sweep, large, workload] > ours[sweep, small, workload], (sweep, workload)
        one, many = scaling.QUICK_PLAN.sweeps["batch"][:2]
        assert ours["batch", many, workload] == pytest.approx(ours["batch", one, workload], rel=0.01), workload


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason='matplotlib is not installed (pip install -e ".[bench]")')
def test_plot_is_a_png(report):
    assert report["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
