"""experiments/adapter_drift.py: the distances and cosines between two runs' adapters, on hand-made
adapters whose answers are known (a drift scaled by 2, a B turned orthogonal)."""
import numpy as np
import pytest

from experiments import adapter_drift


def test_a_rescaled_drift_reads_as_cosine_one_and_ratio_two(monkeypatch):
    a0 = np.arange(6, dtype=np.float32).reshape(1, 2, 3) / 10
    step = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], np.float32).reshape(1, 2, 3)
    b_first = np.array([1.0, 0.0], np.float32).reshape(1, 2, 1)
    b_other = np.array([0.0, 2.0], np.float32).reshape(1, 2, 1)
    runs = {"first": ({"q": {"a": a0 + step, "b": b_first}}, {"q": {"a": a0, "b": 0 * b_first}}, 10),
            "other": ({"q": {"a": a0 + 2 * step, "b": b_other}}, {"q": {"a": a0, "b": 0 * b_first}}, 10)}
    monkeypatch.setattr(adapter_drift, "final_and_initial", lambda workdir: runs[workdir])
    out = adapter_drift.main(["first", "other"])
    versus = out["versus_first"]["other"]
    assert versus["a_drift_cosine"] == pytest.approx(1.0), "the same direction of drift, twice as far"
    assert versus["a_drift_norm_ratio"] == pytest.approx(2.0)
    assert versus["a_distance_over_first_drift"] == pytest.approx(1.0), "|2s - s| / |s|"
    assert versus["b_cosine"] == pytest.approx(0.0, abs=1e-7), "orthogonal B factors"
    assert versus["b_norm_ratio"] == pytest.approx(2.0)
    assert out["runs"]["first"]["a_drift"] == pytest.approx(float(np.linalg.norm(step)), rel=1e-6)
