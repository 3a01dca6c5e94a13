"""`alkpu report` on a real finished `alkpu run` (the session fixture ``finished_run``).

Checked against the run's own files and an independent evaluation of the models; no mocks.
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dpdata
import numpy as np
import pytest

from alkpu_plugin.report import fmt, plot_calibration, plot_histograms, plot_validation, stage_times

from .conftest import QUIET_ENV

pytestmark = pytest.mark.slow
ALKPU = str(Path(sys.executable).parent / "alkpu")
ENV = {**os.environ, **QUIET_ENV, "TF_CPP_MIN_LOG_LEVEL": "3"}


def alkpu_report(*args, timeout=600):
    return subprocess.run([ALKPU, "report", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def lines(path: Path) -> int:
    return len([ln for ln in path.read_text().split("\n") if ln.strip()])


def md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def html_row(cells) -> str:
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def assert_rows_on_pages(md: str, page: str, rows) -> None:
    for row in rows:
        assert md_row(row) + "\n" in md + "\n", md_row(row)
        assert html_row(row) in page, html_row(row)


@pytest.fixture(scope="module")
def validation(hot_and_cold):
    """Held-out EMT frames at 300 K and 1200 K (conftest's), one system per temperature."""
    return hot_and_cold


@pytest.fixture(scope="module")
def report(finished_run, validation, tmp_path_factory):
    root, _ = finished_run
    out = tmp_path_factory.mktemp("report") / "out"
    proc = alkpu_report(root, "--validation", validation, "-o", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "report.json").read_text())
    return root, out, data


def copy_run(root: Path, dest: Path) -> Path:
    """The run without its Kalman states (tens of MB each; the report does not read them)."""
    shutil.copytree(root, dest, symlinks=True, ignore=shutil.ignore_patterns("*.kalman.npz", "remote"))
    return dest


def test_table2_numbers_are_the_runs(report):
    root, out, data = report
    param = json.loads((root / "param.json").read_text())
    r0, r1 = data["rounds"]
    it0 = root / "iter.000000"
    tables = sorted((it0 / "01.model_devi").glob("task.*/model_devi.out"))
    assert tables
    values = np.concatenate([np.loadtxt(p, ndmin=2)[:, 4] for p in tables])
    fp = it0 / "02.fp"
    assert r0["iteration"] == 0 and r0["status"] == "complete"
    assert r0["temps"] == [float(t) for t in param["model_devi_jobs"][0]["temps"]]
    assert r0["frames_explored"] == values.size == 6
    assert r0["selected"] == lines(fp / "candidate.shuffled.000.out")
    assert r0["reliable"] == lines(fp / "rest_accurate.shuffled.000.out")
    assert r0["discarded"] == lines(fp / "rest_failed.shuffled.000.out")
    assert r0["reliable"] + r0["selected"] + r0["discarded"] == r0["frames_explored"]
    assert r0["labelled"] == len([p for p in fp.glob("task.*") if p.is_dir()]) > 0
    # the labelled data DP-GEN collected has as many frames
    (sysdir,) = {p.parent for p in (fp / "data.000").rglob("type.raw")}
    assert dpdata.LabeledSystem(str(sysdir), fmt="deepmd/npy").get_nframes() == r0["labelled"]
    # trust levels of the calibrated rule: DP-GEN's own
    assert r0["trust_lo"] == [0.02] and r0["trust_hi"] == [50.0]
    assert data["selection"] == {"uncertainty": "kpu", "trust": "calibrated", "unit": "eV/Å",
                                 "quantity": "max per-atom force uncertainty (calibrated KPU)"}
    assert r0["values"] == {"min": values.min(), "median": float(np.median(values)), "max": values.max()}
    # iteration 1 trained only (one exploration job): reported as such, with its model
    assert r1["iteration"] == 1 and r1["status"] == "stopped" and r1["last_step"] == "post_train"
    assert [r1[k] for k in ("frames_explored", "reliable", "selected", "discarded", "outside_domain", "labelled",
                            "histogram")] == [None] * 7
    assert r0["outside_domain"] == 0
    assert r1["model"] == "iter.000001/00.train/graph.000.pb"
    assert data["record"] == {"iteration": 1, "step": "post_train"}
    assert any("iteration 1: training only" in n for n in data["notes"])

    md, page = (out / "index.md").read_text(), (out / "index.html").read_text()
    assert_rows_on_pages(md, page, [
        [fmt(r["iteration"]), "/".join(fmt(t) for t in r["temps"]) + " K" if r["temps"] else "–",
         *(fmt(r[k]) for k in ("frames_explored", "reliable", "selected", "discarded", "outside_domain",
                               "labelled")), r["status"]]
        for r in data["rounds"]])
    assert "| 0 | 300 K | 6 |" in md  # the formatting itself, once by hand
    for note in data["notes"]:
        assert f"* {note}" in md and note in page


def test_histograms_hold_every_explored_frame(report):
    root, out, data = report
    r0 = data["rounds"][0]
    h = r0["histogram"]
    values = np.concatenate([np.loadtxt(p, ndmin=2)[:, 4]
                             for p in sorted(root.glob("iter.000000/01.model_devi/task.*/model_devi.out"))])
    assert h["log_x"] is True and np.all(values > 0)
    assert sum(h["counts"]) + h["below"] == r0["frames_explored"] == values.size
    assert h["below"] == int((values < h["bin_edges"][0]).sum())
    assert len(h["bin_edges"]) == len(h["counts"]) + 1 and np.all(np.diff(h["bin_edges"]) > 0)
    counts, _ = np.histogram(values[values >= h["bin_edges"][0]], bins=np.array(h["bin_edges"]))
    assert counts.tolist() == h["counts"]
    # the figure draws exactly these bars and the trust levels
    fig = plot_histograms(data)
    (ax,) = fig.axes
    bars = ax.patches
    assert [b.get_height() for b in bars] == h["counts"]
    np.testing.assert_allclose([b.get_x() for b in bars], h["bin_edges"][:-1], rtol=1e-12)
    np.testing.assert_allclose([b.get_x() + b.get_width() for b in bars], h["bin_edges"][1:], rtol=1e-12)
    assert ax.get_xscale() == "log"
    vlines = sorted(line.get_xdata()[0] for line in ax.get_lines())
    assert vlines == [0.02, 50.0]
    md, page = (out / "index.md").read_text(), (out / "index.html").read_text()
    assert_rows_on_pages(md, page, [[
        "0", fmt(r0["frames_explored"]), fmt(r0["values"]["min"]), fmt(r0["values"]["median"]),
        fmt(r0["values"]["max"]), "0.02", "50"]])


def test_validation_rmse_matches_an_independent_evaluation(report, validation):
    root, out, data = report
    rows = data["validation"]["rmse"]
    assert [s["name"] for s in data["validation"]["sets"]] == ["300K", "1200K"]  # by temperature
    assert [s["temperature"] for s in data["validation"]["sets"]] == [300.0, 1200.0]
    assert sorted((r["iteration"], r["set"]) for r in rows) == [
        (0, "1200K"), (0, "300K"), (1, "1200K"), (1, "300K")]
    # the 1200 K set through dpdata's DeePMD driver, for both rounds' models
    held = dpdata.LabeledSystem(str(validation / "1200K"), fmt="deepmd/npy")
    natoms = held.get_natoms()
    for it in (0, 1):
        pred = held.predict(str(root / f"iter.{it:06d}" / "00.train" / "graph.000.pb"), driver="dp")
        e_rmse = np.sqrt(np.mean(((pred["energies"] - held["energies"]) / natoms) ** 2))
        f_rmse = np.sqrt(np.mean((pred["forces"] - held["forces"]) ** 2))
        (row,) = [r for r in rows if r["iteration"] == it and r["set"] == "1200K"]
        assert row["frames"] == held.get_nframes() == 8
        np.testing.assert_allclose([row["energy_rmse_per_atom"], row["force_rmse"]], [e_rmse, f_rmse], rtol=1e-9)
    assert all(0 < r["energy_rmse_per_atom"] < 1 and 0 < r["force_rmse"] < 5 for r in rows)
    md, page = (out / "index.md").read_text(), (out / "index.html").read_text()
    assert_rows_on_pages(md, page, [[fmt(r["iteration"]), r["set"], fmt(r["frames"]),
                                     fmt(r["energy_rmse_per_atom"]), fmt(r["force_rmse"])] for r in rows])
    # the figure's lines are these numbers, one per set
    fig = plot_validation(data)
    ax_e, ax_f = fig.axes
    for ax, key in ((ax_e, "energy_rmse_per_atom"), (ax_f, "force_rmse")):
        lines_ = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines_) == {"300K", "1200K"}
        for name, line in lines_.items():
            mine = sorted((r for r in rows if r["set"] == name), key=lambda r: r["iteration"])
            assert list(line.get_xdata()) == [0, 1]
            assert list(line.get_ydata()) == [r[key] for r in mine]


def test_calibration_deciles_as_saved_by_the_run(report):
    root, out, data = report
    md, page = (out / "index.md").read_text(), (out / "index.html").read_text()
    fig = plot_calibration(data)
    (ax,) = fig.axes
    drawn = {line.get_label(): line for line in ax.get_lines()}
    for r in data["rounds"]:
        saved = json.loads((root / f"iter.{r['iteration']:06d}" / "00.train" / "kalman.000.calibration.json")
                           .read_text())
        cal = r["calibration"]
        assert cal["a"] == saved["a"] and cal["b"] == saved["b"] and cal["n_atoms"] == saved["n_atoms"]
        assert cal["deciles"] == saved["deciles"] and len(cal["deciles"]) == 10
        assert sum(d["atoms"] for d in cal["deciles"]) == cal["n_atoms"]
        assert_rows_on_pages(md, page, [[fmt(r["iteration"]), fmt(cal["a"]), fmt(cal.get("p", 1.0)), fmt(cal["b"]),
                                         fmt(cal["n_atoms"]), cal["fitted_on"]]])
        assert_rows_on_pages(md, page, [
            [fmt(r["iteration"]), fmt(d["decile"]), fmt(d["atoms"]), fmt(d["kpu_min"]), fmt(d["kpu_max"]),
             fmt(d["observed_rms_error"]), fmt(d["predicted_rms_error"])] for d in cal["deciles"]])
        line = drawn[f"iteration {r['iteration']}"]
        assert list(line.get_xdata()) == [d["predicted_rms_error"] for d in cal["deciles"]]
        assert list(line.get_ydata()) == [d["observed_rms_error"] for d in cal["deciles"]]
    diag = drawn["y = x"]
    assert list(diag.get_xdata()) == list(diag.get_ydata())


def test_stage_times_from_the_stage_log(report):
    root, out, data = report
    records = [json.loads(ln) for ln in (root / "alkpu-stages.jsonl").read_text().splitlines()]
    times = data["stage_times"]
    assert times == json.loads(json.dumps(stage_times(root)))
    assert [it["iteration"] for it in times["iterations"]] == [0, 1]
    for it in times["iterations"]:
        mine = [r for r in records if r["iter"] == it["iteration"]]

        def cpu(*stages, mine=mine):
            return sum(r["cpu_s"] for r in mine if r["stage"] in stages)

        assert it["training"]["cpu_s"] == pytest.approx(cpu("make_train", "run_train", "post_train"), abs=2e-3)
        assert it["labelling"]["cpu_s"] == pytest.approx(cpu("make_fp", "run_fp", "post_fp"), abs=2e-3)
        md_stages = cpu("make_model_devi", "run_model_devi", "post_model_devi")
        timings = [json.loads(p.read_text()) for p in
                   (root / f"iter.{it['iteration']:06d}" / "01.model_devi").glob("task.*/alkpu_timing.json")]
        kpu = min(sum(t["kpu_cpu_s"] for t in timings), md_stages)
        assert it["kpu_in_exploration"]["cpu_s"] == pytest.approx(kpu, abs=2e-3)
        assert it["md"]["cpu_s"] == pytest.approx(md_stages - kpu, abs=2e-3)
        assert it["uncertainty"]["cpu_s"] == pytest.approx(cpu("kpu_calibration") + kpu, abs=2e-3)
        assert it["total"]["cpu_s"] == pytest.approx(sum(r["cpu_s"] for r in mine), abs=5e-3)
    it0 = times["iterations"][0]
    assert it0["kpu_in_exploration"]["tasks_timed"] == 1 and it0["uncertainty"]["cpu_s"] > 0
    md, page = (out / "index.md").read_text(), (out / "index.html").read_text()
    cats = [*times["categories"], "total"]
    assert_rows_on_pages(md, page, [[fmt(it["iteration"]), *(f"{fmt(it[c]['cpu_s'])} / {fmt(it[c]['wall_s'])}"
                                                            for c in cats)] for it in times["iterations"]])


def test_figures_and_pages(report):
    _, out, data = report
    from matplotlib.image import imread

    assert data["figures"] == {"progress": "progress.png", "histograms": "kpu_histograms.png",
                               "validation": "validation_rmse.png", "calibration": "calibration.png"}
    md, page = (out / "index.md").read_text(), (out / "index.html").read_text()
    embedded = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    # the summary figure first (test_report_page.py looks at the page in a browser)
    assert [k for k, _ in embedded] == ["progress", "calibration", "histograms", "validation"]
    for key, b64 in embedded:
        png = out / data["figures"][key]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert base64.b64decode(b64) == png.read_bytes()  # self-contained: the same image inside
        assert f"![{key}]({png.name})" in md
        pixels = imread(png)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels[..., :3].std() > 0.05
    assert "src=\"http" not in page and "href=" not in page


def test_defaults_overwrite_and_iteration_in_progress(finished_run, validation, tmp_path):
    """RUN_DIR/validation and RUN_DIR/report by default; no silent overwrite; a run cut inside run_fp."""
    root = copy_run(finished_run[0], tmp_path / "run")
    shutil.copytree(validation, root / "validation")
    # as if killed while labelling iteration 0: make_fp done, run_fp not
    shutil.rmtree(root / "iter.000001")
    shutil.rmtree(root / "iter.000000" / "02.fp" / "data.000")
    (root / "record.dpgen").write_text("".join(f"0 {j}\n" for j in range(7)))
    (root / "alkpu-stages.jsonl").unlink()
    proc = alkpu_report(root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = root / "report"
    data = json.loads((out / "report.json").read_text())
    (r0,) = data["rounds"]
    assert r0["status"] == "in progress" and r0["last_step"] == "make_fp"
    assert r0["frames_explored"] == 6 and r0["labelled"] == len(list((root / "iter.000000/02.fp").glob("task.*")))
    assert data["validation"]["dir"] == str(root / "validation") and len(data["validation"]["rmse"]) == 2
    assert data["stage_times"] is None and "Cost per iteration" not in (out / "index.md").read_text()
    note = "iteration 0 is in progress (last finished step: make_fp); it is reported up to what exists"
    assert data["notes"] == [note]
    assert note in (out / "index.md").read_text() and note in (out / "index.html").read_text()
    # a second report does not overwrite the first unless asked
    before = (out / "report.json").read_bytes()
    proc = alkpu_report(root)
    assert proc.returncode != 0
    assert proc.stderr.strip() == (f"alkpu report: error: {out} exists and is not empty; choose another "
                                   "output (-o) or pass --overwrite")
    assert (out / "report.json").read_bytes() == before
    (out / "stale.txt").write_text("not ours")
    proc = alkpu_report(root, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "report.json").read_text()) == data
    assert (out / "stale.txt").exists()  # only the report's own files are replaced


def test_not_a_run_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = alkpu_report(empty, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err == (f"alkpu report: error: {empty} is not a DP-GEN run directory (param.json and "
                   "record.dpgen missing); pass the directory in which `alkpu run param.json "
                   "machine.json` (or `dpgen run`) ran")
    assert list(empty.iterdir()) == []  # no report directory made
    # with -o elsewhere: nothing made either
    proc = alkpu_report(empty, "-o", tmp_path / "out", timeout=120)
    assert proc.returncode != 0 and not (tmp_path / "out").exists()
    # record.dpgen present, param.json missing: the other fix
    (empty / "record.dpgen").write_text("0 0\n")
    proc = alkpu_report(empty, timeout=120)
    assert proc.returncode != 0
    assert "param.json missing); copy the param file given to `alkpu run` there under the name param.json" \
        in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
