"""The `alkpu report` page as a person sees it: rendered by a real headless browser (Debian's
chromium), on a run directory the size of `make demo` (nine rounds, five validation sets).

The run directory is written by hand (DP-GEN's file layout, no training): the page, not the
numbers, is under test here; test_report.py checks the numbers against a real run.
"""

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from alkpu_plugin.report import build_report, plot_histograms, write_pages

TEMPS = [300, 500, 500, 800, 800, 1200, 1200, 1400, 1400]
SETS = [300, 500, 800, 1200, 1400]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def demo_like_run(root: Path) -> Path:
    """Nine explored rounds of 101 frames, as `alkpu run` leaves them."""
    rng = np.random.default_rng(0)
    root.mkdir()
    jobs = [{"sys_idx": [0], "temps": [t], "nsteps": 1000} for t in TEMPS]
    (root / "param.json").write_text(json.dumps({
        "uncertainty": "kpu", "model_devi_f_trust_lo": 0.05, "model_devi_f_trust_hi": 0.3,
        "model_devi_jobs": jobs}))
    (root / "record.dpgen").write_text("".join(f"{ii} {j}\n" for ii in range(9) for j in range(9)))
    stages = []
    for ii, temp in enumerate(TEMPS):
        it = root / f"iter.{ii:06d}"
        train, md, fp = it / "00.train", it / "01.model_devi", it / "02.fp"
        task = md / "task.000.000000"
        task.mkdir(parents=True)
        train.mkdir()
        fp.mkdir()
        # selection values spanning about two decades, one start frame far below (log axis)
        values = np.exp(rng.normal(math.log(0.02 * (1 + ii / 3)), 0.6, 101))
        values[0] = 1e-15
        table = np.zeros((101, 7))
        table[:, 0] = np.arange(0, 1010, 10)
        table[:, 4] = values
        np.savetxt(task / "model_devi.out", table)
        rel, sel = values < 0.05, (values >= 0.05) & (values < 0.3)
        for stem, mask in (("rest_accurate", rel), ("candidate", sel), ("rest_failed", ~rel & ~sel)):
            (fp / f"{stem}.shuffled.000.out").write_text("".join(f"{task} {int(s)}\n" for s in table[mask, 0]))
        for k in range(min(10, int(sel.sum()))):
            (fp / f"task.000.{k:06d}").mkdir()
        pred = np.linspace(0.01, 0.03, 10) * (1 + ii / 10)
        (train / "kalman.000.calibration.json").write_text(json.dumps({
            "a": 1.7e-9, "b": 0.0, "n_atoms": 768, "fitted_on": "24 training frames",
            "deciles": [{"decile": d + 1, "atoms": 77, "kpu_min": 1e5 * (d + 1), "kpu_max": 1e5 * (d + 2),
                         "observed_rms_error": float(p * (1 + 0.3 * d / 9)), "predicted_rms_error": float(p)}
                        for d, p in enumerate(pred)]}))
        for stage, cpu in (("run_train", 8.0), ("run_model_devi", 30.0), ("run_fp", 3.0)):
            stages.append({"iter": ii, "stage": stage, "cpu_s": cpu, "wall_s": cpu * 0.8})
    (root / "alkpu-stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    return root


def demo_like_report(tmp_path: Path) -> tuple[dict, Path]:
    data = build_report(demo_like_run(tmp_path / "run"))
    # validation RMSE per round and set, as `alkpu report --validation` adds it (the real
    # evaluation is test_report.py's)
    data["validation"]["sets"] = [{"name": f"{t}K", "path": f"validation/{t}K", "temperature": float(t),
                                   "frames": 20, "atoms": [32]} for t in SETS]
    data["validation"]["rmse"] = [
        {"iteration": ii, "set": f"{t}K", "temperature": float(t), "frames": 20,
         "energy_rmse_per_atom": 1e-4 * (1 + t / 500) / (1 + ii), "force_rmse": 0.01 * (1 + t / 300) / (1 + ii / 2)}
        for ii in range(9) for t in SETS]
    out = write_pages(data, tmp_path / "report")
    return data, out


PROBE = """<script>
window.addEventListener("load", () => {
  const visible = (el) => (el.checkVisibility ? el.checkVisibility() : el.getClientRects().length > 0);
  const summary = document.getElementById("summary");
  const r = {
    images: [...document.images].map((i) => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0,
                                             width: i.naturalWidth, shown: i.getBoundingClientRect().width})),
    headings: [...document.querySelectorAll("h1, h2")].map((h) => h.textContent),
    summary_top: summary ? summary.getBoundingClientRect().top : null,
    first_table_in_summary: summary ? summary.contains(document.querySelector("table")) : false,
    first_image_in_summary: summary ? summary.contains(document.images[0]) : false,
    visible_rows: [...document.querySelectorAll("tr")].filter(visible).length,
    all_rows: document.querySelectorAll("tr").length,
    height: document.documentElement.scrollHeight,
  };
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def test_page_in_a_headless_browser(tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; `make test` installs it "
                    "when run as root)")
    data, out = demo_like_report(tmp_path)
    page = (out / "index.html").read_text()
    probed = out / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1600",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0]
    probe = json.loads(text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))

    # every figure loads and is drawn at a readable size, the summary figure first
    assert [i["alt"] for i in probe["images"]] == ["progress", "calibration", "histograms", "validation"]
    for img in probe["images"]:
        assert img["loaded"] and img["width"] > 300, img
    # the summary comes first: right under the title, with Table 2 and the summary figure in it
    assert probe["headings"][:2] == ["ALKPU run report", "Summary"]
    assert probe["first_table_in_summary"] and probe["first_image_in_summary"]
    assert probe["summary_top"] < 150
    # the long tables (45 validation rows, 90 deciles, ...) are folded: a page read in a minute
    assert probe["all_rows"] > 150
    assert probe["visible_rows"] <= 9 + 1 + 2, probe["visible_rows"]  # Table 2 (with header) and the cost line
    summary = page.split('<section id="summary">', 1)[1].split("</section>", 1)[0]
    assert "9 exploration round(s) at 300–1400 K: 909 frames explored" in summary
    assert "Validation force RMSE on 1400K (20 held-out frames)" in summary

    # and a screenshot a person can look at (kept next to the report)
    shot = out / "screenshot.png"
    proc = subprocess.run([browser, *flags, f"--screenshot={shot}", (out / "index.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels[:800, :, :3].std() > 0.05  # the top of the page is not blank


def _overlaps(labels) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), t.get_window_extent()) for t in labels if t.get_visible() and t.get_text()]
    return [(a, b) for k, (a, ba) in enumerate(boxes) for b, bb in boxes[k + 1:] if ba.overlaps(bb)]


@pytest.mark.parametrize("spread", [0.2, 3.0])
def test_histogram_tick_labels_do_not_overlap(tmp_path, spread):
    """Log-scale selection values over a fraction of a decade and over several decades: a few
    labelled ticks, none overlapping, on every panel."""
    data = build_report(demo_like_run(tmp_path / "run"))
    for r in data["rounds"]:
        h = r["histogram"]
        lo = h["bin_edges"][0]
        h["bin_edges"] = list(np.geomspace(lo, lo * 10 ** spread, len(h["bin_edges"])))
    fig = plot_histograms(data)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert renderer is not None
    assert len(fig.axes) == 9
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert 2 <= len(labels) <= 8, [t.get_text() for t in labels]
        assert not _overlaps(ax.get_xticklabels()), _overlaps(ax.get_xticklabels())
