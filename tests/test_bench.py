"""research/bench.py runs end to end on tiny sizes and reports what it says it reports.

These tests check the harness (every benchmark runs, rows carry the requested sizes, the JSON and the
plot are written, token counts come from the model, projections follow from the measured times, a
crashed measurement raises instead of hanging); they never judge a timing.
"""
import json

import pytest

from research import bench


@pytest.mark.filterwarnings("ignore:Data has no positive values")   # tiny sizes can measure 0 MB extra
def test_exchange_rows_json_and_plot(tmp_path):
    assert bench.main(["exchange", "--tokens", "64", "96", "--dim", "16", "--slots", "4", "--repeats", "1",
                       "--json", str(tmp_path / "x.json"), "--plot", str(tmp_path / "x.png")]) is None  # exit 0
    saved = json.loads((tmp_path / "x.json").read_text())
    assert [r["tokens"] for r in saved["rows"]] == [64, 96]
    assert all(r["kem_ms"] > 0 and r["cross_ms"] > 0 and r["proj3_ms"] > 0 for r in saved["rows"])
    assert saved["args"]["dim"] == 16 and "torch" in saved["machine"]
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_and_etf(tmp_path):
    step = bench.bench_step(["--sizes", "32x48", "--batch", "2", "--dim", "16", "--exchanges", "kem", "none",
                             "--repeats", "1", "--json", str(tmp_path / "s.json")])
    assert [(r["exchange"], r["tokens"]) for r in step] == [("kem", 6 * 4 * 6), ("none", 6 * 4 * 6)]
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == step
    etf = bench.bench_etf(["--tokens", "64", "--dim", "16", "--repeats", "1"])
    assert etf[0]["tokens"] == 64 and etf[0]["etf_ms"] > 0


def test_step_over_two_processes_averages_gradients_as_train_does():
    """--procs 2: two processes in one gloo group, each step's gradients all-reduced by DDP."""
    (row,) = bench.bench_step(["--sizes", "32x48", "--batch", "2", "--dim", "16", "--exchanges", "kem",
                               "--procs", "2", "--repeats", "1"])
    assert row["procs"] == 2 and row["ms"] > 0
    seconds, _, info = bench.measure(("step", "kem", 32, 48, 1, 16, (("semseg", 3), ("depth", 1))), repeats=1,
                                     info=True, procs=2)
    assert info == {"processes": 2}


def test_data_and_edges():
    data = bench.bench_data(["--samples", "2", "--sizes", "32x48"])
    assert len(data) == 1 and data[0]["size"] == (32, 48) and data[0]["samples_per_s"] > 0
    edges = bench.bench_edges(["--images", "1", "--size", "48", "64", "--thresholds", "9", "--processes", "1"])
    assert [r["exact"] for r in edges] == [True, False]
    assert all(0 <= r["odsF"] <= 1 for r in edges)


def test_presets_rows_tokens_from_the_model_and_projections(tmp_path):
    rows = bench.bench_presets(["--presets", "nyud", "pascal", "--backbones", "tiny", "--exchanges", "kem",
                                "--size", "32x48", "--repeats", "1", "--json", str(tmp_path / "p.json")])
    assert [(r["preset"], r["backbone"], r["exchange"]) for r in rows] == [("nyud", "tiny", "kem"),
                                                                           ("pascal", "tiny", "kem")]
    for r in rows:
        T = {"nyud": 4, "pascal": 5}[r["preset"]]
        assert r["tokens"] == r["eval_tokens"] == T * (32 // 8) * (48 // 8)     # tiny backbone: stride 8
        assert r["step_s"] > 0 and r["forward_s"] > 0 and r["edges_s"] > 0 and r["step_mb"] >= 0
        assert r["load_before"] >= 0 and r["load_after"] >= 0
        assert r["train_hours"] == pytest.approx(r["steps"] * r["step_s"] / 3600)
        assert r["val_minutes"] == pytest.approx(r["val_images"] * (r["forward_s"] + r["edges_s"]) / 60)
        assert r["steps"] == 40000 and r["val_images"] == {"nyud": 654, "pascal": 5105}[r["preset"]]
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["rows"] == rows and "load" in saved["machine"]


def test_failed_measurement_raises_instead_of_hanging():
    with pytest.raises(RuntimeError, match="exited with code"):
        bench.measure(("no-such-module", 8, 4, 1, 0, 0), repeats=1)


def test_each_benchmark_has_its_own_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["step", "--help"])
    assert exit_.value.code == 0 and "--sizes" in capsys.readouterr().out


def test_presets_take_their_sizes_from_the_dataset_defaults():
    """Without --size each preset runs at its protocol crop and eval size (tiny backbone: quick)."""
    import datasets

    (row,) = bench.bench_presets(["--presets", "nyud", "--backbones", "tiny", "--exchanges", "none", "--repeats", "1"])
    assert row["train_size"] == list(datasets.DEFAULT_SIZES["nyud"]["train"])
    assert row["eval_size"] == list(datasets.DEFAULT_SIZES["nyud"]["eval"])
