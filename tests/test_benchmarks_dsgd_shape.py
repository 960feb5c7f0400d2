"""benchmarks/dsgd_shape.py: the published-shape checks on given accuracies."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("dsgd_shape", Path(__file__).resolve().parents[1] / "benchmarks/dsgd_shape.py")
shape = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shape)


def table(krum_alie=0.40, krum_wm_alie=0.70, cclip_wm_worst=0.78, bucket_worst=0.79):
    return {"mean": {"clean": 0.82, "alie": 0.60, "ipm": 0.50},
            "krum": {"clean": 0.75, "alie": krum_alie, "ipm": 0.45},
            "krum+wm": {"clean": 0.78, "alie": krum_wm_alie, "ipm": 0.72},
            "median": {"clean": 0.80, "alie": 0.50, "ipm": 0.55},
            "median+wm": {"clean": 0.80, "alie": 0.75, "ipm": 0.74},
            "cclip+wm": {"clean": 0.82, "alie": cclip_wm_worst, "ipm": 0.80},
            "bucketing+cclip+wm": {"clean": 0.82, "alie": bucket_worst, "ipm": 0.81}}


def test_the_published_shape_is_met_when_the_numbers_show_it():
    checks = shape.shape_checks(table(), "dirichlet(0.5)")
    assert len(checks) == 10 and all(ok for ok, _ in checks), checks


def test_each_claim_fails_on_numbers_that_contradict_it():
    def missed(**kw):
        return [line for ok, line in shape.shape_checks(table(**kw), "dirichlet(0.5)") if not ok]

    assert any("alie breaks krum" in line for line in missed(krum_alie=0.78))  # a 4-point drop is no break
    assert any("momentum helps krum under alie" in line for line in missed(krum_wm_alie=0.42))
    assert any("cclip with worker momentum holds" in line for line in missed(cclip_wm_worst=0.70))
    assert any("bucketing helps" in line for line in missed(bucket_worst=0.70))
    # on IID data bucketing is not expected to help: no such check
    assert not any("bucketing" in line for _, line in shape.shape_checks(table(bucket_worst=0.1), "iid"))
