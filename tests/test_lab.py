"""The quantization lab: its pieces, and a ``--quick`` CLI run that writes the CSVs, PNGs and tables."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from fplab import lab


def test_rosenbrock_and_its_minimum() -> None:
    assert lab.rosenbrock(torch.tensor([1.0, 1.0])).item() == 0.0
    assert lab.rosenbrock(torch.tensor([-1.5, 2.0])).item() == pytest.approx(2.5**2 + 100 * 0.25**2)
    (x,) = lab.rosenbrock_init(3)
    assert x.shape == (3, 1, 2)
    assert torch.equal(lab.rosenbrock_init(1)[0][0], x[0])  # seed s starts at the same point whatever S is


def test_component_formats() -> None:
    assert lab.component_formats("adam", "all", 3) == {"g": (8, 3), "w": (8, 3), "m": (8, 3), "v": (8, 3)}
    assert lab.component_formats("adam", "V", 1) == {"g": None, "w": None, "m": None, "v": (8, 1)}
    assert lab.component_formats("muon", "W", 2) == {"g": None, "w": (8, 2), "m": None}
    with pytest.raises(ValueError, match=r"'adam' or 'muon'.*'sgd'"):
        lab.make_optimizer("sgd", [torch.zeros(2, requires_grad=True)], 0.1)


def test_seeds_are_independent_runs() -> None:
    """Batched seeds (Muon orthogonalizes per seed) give the same trajectory as a run of that seed alone."""
    cfg3, cfg1 = lab.Config(steps=20, seeds=3), lab.Config(steps=20, seeds=1)
    for optimizer in ("adam", "muon"):
        fmts = lab.component_formats(optimizer, "all", 3)
        many = lab.run("rosenbrock", optimizer, fmts, cfg3)["curve"]
        one = lab.run("rosenbrock", optimizer, fmts, cfg1)["curve"]
        torch.testing.assert_close(many[:, :1], one)


def test_fits() -> None:
    T = [16, 32, 64, 128, 256, 512]
    fit = lab.fit_log_and_power(T, [1 + 2 * math.log(t) for t in T])
    assert fit["log_slope"] == pytest.approx(2) and fit["log_r2"] == pytest.approx(1)
    fit = lab.fit_log_and_power(T, [3 * t**0.5 for t in T])
    assert fit["power"] == pytest.approx(0.5) and fit["power_r2"] == pytest.approx(1)
    assert math.isnan(lab.fit_log_and_power(T[:2], [1.0, 2.0])["power"])


def test_median_treats_nan_as_diverged() -> None:
    assert lab.median([1.0, 3.0, 2.0]) == 2.0
    assert lab.median([1.0, math.nan, math.nan]) == math.inf


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_cli_writes_csv_png_and_tables(tmp_path: Path, capsys) -> None:
    assert lab.main(["all", "--quick", "--out", str(tmp_path)]) == 0
    for name in ("rosenbrock.png", "mlp.png", "errgrowth.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_csv(tmp_path / "rosenbrock.csv")
    # adam: 5 components, muon: 4, each at the quick mantissas (23, 2), one seed
    assert len(rows) == (5 + 4) * 2
    assert {r["component"] for r in rows} == {"all", "G", "W", "M", "V"}
    exact = [r for r in rows if r["man_bits"] == "23"]
    assert len({r["final_loss"] for r in exact if r["optimizer"] == "adam"}) == 1  # M=23 is the exact run
    mlp = read_csv(tmp_path / "mlp.csv")
    assert all(0 <= float(r["test_acc"]) <= 1 for r in mlp)
    assert read_csv(tmp_path / "mlp_curves.csv")[0].keys() >= {"step", "loss", "man_bits"}
    err = read_csv(tmp_path / "errgrowth.csv")
    assert {r["precision"] for r in err} == {"e8m10", "e8m7", "horizon rule"}
    assert all(float(r["deviation"]) >= 0 for r in err)
    out = capsys.readouterr().out
    assert "| adam | V |" in out and "a + b ln T" in out
    assert "### mlp" in (tmp_path / "tables_all.md").read_text()


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        lab.main(["sgd", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        lab.main(["rosenbrock", "--steps", "0", "--out", str(tmp_path)])
