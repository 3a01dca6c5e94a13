"""Errors a user can fix: messages that say what differs and what to do, and `alkpu run` resuming
from record.dpgen once the cause is fixed."""

import json
import os
import re
import shutil
import signal
import time
import zipfile

import numpy as np
import pytest

from alkpu_plugin.calibration import CalibrationError, load_calibration, save_calibration
from alkpu_plugin.kalman import (BlockLayout, FilterOptions, KalmanFilter, KalmanStateError,
                                 LayoutMismatchError, load_state, read_meta, save_state)

SHAPES = [("w1", (3, 4)), ("b1", (4,)), ("w2", (4, 2))]


def tiny_state(path, tensors=SHAPES, blocksize=8, **extra):
    return save_state(path, KalmanFilter(BlockLayout.build(tensors, blocksize), FilterOptions()),
                      extra={"weights_sha256": "ab" * 32, "step": 7, **extra})


# ------------------------------------------------------------------ damaged files, no TensorFlow
def test_damaged_state_file_is_named_never_a_raw_traceback(tmp_path):
    good = tiny_state(tmp_path / "good.kalman.npz")
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.kalman.npz"
    truncated.write_bytes(raw[: len(raw) // 2])
    for call in (read_meta, load_state):
        with pytest.raises(KalmanStateError, match=re.escape(str(truncated)) + ".* is damaged .truncated"):
            call(truncated)
    # meta readable, a covariance block corrupted: the CRC check fails inside load_state
    corrupt = tmp_path / "corrupt.kalman.npz"
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("P_000.npy")
    data = bytearray(raw)
    data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF  # inside P_000's bytes
    corrupt.write_bytes(bytes(data))
    assert read_meta(corrupt)["extra"]["step"] == 7
    with pytest.raises(KalmanStateError, match="corrupt.kalman.npz is not a Kalman state file that can be read: "
                                               "it is damaged .* Bad CRC-32"):
        load_state(corrupt)
    # through a link both names are given
    link = tmp_path / "kalman.000.npz"
    link.symlink_to(truncated.name)
    with pytest.raises(KalmanStateError, match=f"kalman.000.npz .a link to {re.escape(str(truncated))}. is not"):
        read_meta(link)
    # other files
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(KalmanStateError, match="is not a Kalman state file: it holds no 'meta' entry"):
        read_meta(npy)
    junk = tmp_path / "junk.npz"
    junk.write_text("nope")
    with pytest.raises(KalmanStateError, match="junk.npz is not a Kalman state file"):
        load_state(junk)
    with pytest.raises(KalmanStateError, match="does not exist"):
        read_meta(tmp_path / "missing.kalman.npz")


def test_layout_mismatch_says_what_differs_and_what_to_do(tmp_path):
    path = tiny_state(tmp_path / "s.kalman.npz")
    model = BlockLayout.build(SHAPES, 8)
    load_state(path, model)  # its own layout
    with pytest.raises(LayoutMismatchError, match=r"blocksize 8 != 16 .* Set the optimizer's blocksize to 8 "
                                                  r'\(or "auto"'):
        load_state(path, BlockLayout.build(SHAPES, 16))
    with pytest.raises(LayoutMismatchError, match=r"tensor b1 has shape \[5\] in the model, \[4\] in the state"):
        load_state(path, BlockLayout.build([SHAPES[0], ("b1", (5,)), SHAPES[2]], 8))
    # a state with weights the model leaves out (an earlier trainer kept resnet_dt's unused idt)
    old = tiny_state(tmp_path / "old.kalman.npz", SHAPES + [("filter_type_0/idt_1_0", (4,))])
    with pytest.raises(LayoutMismatchError) as info:
        load_state(old, model)
    text = str(info.value)
    assert "model has 3, state has 4; 0 missing from the state: none; 1 unknown to the model: " \
           "filter_type_0/idt_1_0" in text
    assert "earlier version of this trainer" in text and '"reset_state": true' in text
    # tensors missing from the state: another model, no such hint
    many = [(f"t{i}", (2,)) for i in range(6)]
    with pytest.raises(LayoutMismatchError) as info:
        load_state(path, BlockLayout.build(SHAPES + many, 8))
    assert "6 missing from the state: t0, t1, t2 and 3 more" in str(info.value)
    assert "earlier version" not in str(info.value)


def test_damaged_calibration_raises_naming_the_file(tmp_path):
    state = tiny_state(tmp_path / "s.kalman.npz")
    assert load_calibration(state) is None  # none saved
    path = save_calibration(state, {"a": 2.0, "b": 0.1})
    assert load_calibration(state)["a"] == 2.0
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(CalibrationError, match=re.escape(str(path)) + r" is damaged \(truncated or not JSON: "
                                               r".*Delete it, then fit it again: `alkpu calibrate"):
        load_calibration(state)
    path.write_text(json.dumps({"b": 1.0}))
    with pytest.raises(CalibrationError, match="no fitted scale 'a'"):
        load_calibration(state)
    # one fitted for other weights is not used (never silently applied to this state)
    path.write_text(json.dumps({"a": 2.0, "weights_sha256": "cd" * 32}))
    assert load_calibration(state) is None


def test_damaged_kpu_train_is_named(tmp_path, monkeypatch):
    from alkpu_plugin.dpgen.driver import KPU_TRAIN, kpu_mdata

    monkeypatch.chdir(tmp_path)
    train = tmp_path / "iter.000000" / "00.train"
    train.mkdir(parents=True)
    (train / KPU_TRAIN).write_text(json.dumps({"kpu_train": 0.25, "frames": 20}))
    assert "--relative-to 0.25 " in kpu_mdata(0, {}, {}, {"trust": "relative"})["model_devi_command"]
    (train / KPU_TRAIN).write_text('{"kpu_tr')
    with pytest.raises(CalibrationError, match=f"iter.000000/00.train/{KPU_TRAIN} is damaged .*delete it, and "
                                               "`alkpu run` computes KPU_train again"):
        kpu_mdata(0, {}, {}, {"trust": "relative"})


# ------------------------------------------------------------------ a frozen model and its state
def state_for(graph, path, change_layout=None, **extra):
    """A Kalman state like graph's own, its layout passed through change_layout."""
    from alkpu_plugin.deepmd_tf.frozen import find_kalman_state

    meta = read_meta(find_kalman_state(graph))
    tensors = list(zip(meta["layout"]["names"], meta["layout"]["shapes"]))
    if change_layout:
        tensors = change_layout(tensors)
    kf = KalmanFilter(BlockLayout.build(tensors, meta["layout"]["blocksize"]), FilterOptions())
    return save_state(path, kf, extra={**meta["extra"], **extra}), meta


def test_state_of_another_model_names_tensors_shapes_digests(trained_model, tmp_path):
    from alkpu_plugin.deepmd_tf.frozen import check_state_matches_model

    _, graph = trained_model
    # other values: both digests (12 hex digits) and the state's training step
    other, meta = state_for(graph, tmp_path / "other.kalman.npz", weights_sha256="0123456789ab" + "0" * 52,
                            step=123)
    with pytest.raises(KalmanStateError) as info:
        check_state_matches_model(graph, other)
    text = str(info.value)
    assert "same tensors and shapes, other values" in text
    assert re.search(r"weights sha256 [0-9a-f]{12} in the model, 0123456789ab in the state, which was saved "
                     r"at training step 123", text)
    assert "dp freeze -o graph.pb" in text and "--kalman-state" in text
    assert meta["extra"]["weights_sha256"][:12] in text  # the model's own digest

    def reshape_last(tensors):
        (name, shape), rest = tensors[-1], tensors[:-1]
        return rest + [(name, [shape[0] + 1, *shape[1:]])]

    reshaped, _ = state_for(graph, tmp_path / "reshaped.kalman.npz", reshape_last)
    with pytest.raises(KalmanStateError, match=r"tensor .* has shape \[\d+.*\] in the model, \[\d+.*\] in the "
                                               r"state \(another architecture\)"):
        check_state_matches_model(graph, reshaped)

    # tensors the graph has no node of (an earlier trainer's resnet_dt idt): retrain or reset_state
    def add_idt(tensors):
        return tensors + [("filter_type_0/idt_1_0", [16]), ("filter_type_0/idt_1_1", [16])]

    stale, _ = state_for(graph, tmp_path / "stale.kalman.npz", add_idt)
    with pytest.raises(KalmanStateError) as info:
        check_state_matches_model(graph, stale)
    text = str(info.value)
    n = len(meta["layout"]["names"]) + 2
    assert f"lacks 2 of the {n} weight tensors the Kalman state lists (filter_type_0/idt_1_0, " \
           "filter_type_0/idt_1_1)" in text
    assert "stale.kalman.npz" in text and '"reset_state": true' in text and "Train again" in text
    # missing tensors and another shape: another model, not the stale-trainer hint
    mixed, _ = state_for(graph, tmp_path / "mixed.kalman.npz", lambda t: add_idt(reshape_last(t)))
    with pytest.raises(KalmanStateError) as info:
        check_state_matches_model(graph, mixed)
    assert "belongs to another model" in str(info.value) and "reset_state" not in str(info.value)


# ------------------------------------------------------------------ a real `alkpu run`
def run_until(root, step):
    """`alkpu run` until record.dpgen shows ``step``, then kill it (between or inside steps)."""
    from .dpgen_run import alkpu_run, records

    proc = alkpu_run(root)
    deadline = time.time() + 600
    while step not in records(root):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_to_end(root):
    from .dpgen_run import alkpu_run

    proc = alkpu_run(root)
    out, _ = proc.communicate(timeout=900)
    return proc.returncode, out


@pytest.mark.slow
def test_failed_step_resumes_once_the_file_is_fixed(tmp_path):
    from .dpgen_run import FAIL, make_workdir, records, wrap_command

    # nothing selected for labelling (trust levels above every sigma, and no frame raised to a candidate
    # for lying beyond the calibrated KPU range): iteration 1 keeps iteration 0's model, so the run ends quickly
    root = make_workdir(tmp_path / "run", model_devi_f_trust_lo=49.0, model_devi_f_trust_hi=50.0,
                        kpu={"extrapolation": 0})
    # the training job fails once (dpdispatcher retries it); exploration fails while a marker exists
    (tmp_path / "train-fails-once").touch()
    wrap_command(root, "train", FAIL, "once", tmp_path / "train-fails-once", retry_count=1)
    broken = tmp_path / "exploration-broken"
    wrap_command(root, "model_devi", FAIL, "while", broken, retry_count=1)
    train = root / "iter.000000" / "00.train"
    run_until(root, (0, 1))  # trained: DP-GEN's run_train brought back the model and its Kalman state
    assert records(root)[-1] == (0, 1)
    assert not (tmp_path / "train-fails-once").exists()  # it failed once, and the retry trained
    assert "simulated failure (once" in (train / "000" / "train.log").read_text()
    frozen = (train / "000" / "frozen_model.pb").stat().st_mtime_ns
    # post_train: the Kalman state beside the trained model is missing
    state = train / "000" / "model.ckpt.kalman.npz"
    shutil.move(state, tmp_path / "state.npz")
    rc, out = run_to_end(root)
    assert rc != 0 and "Traceback" not in out, out[-3000:]
    assert ("alkpu run: error: the Kalman state iter.000000/00.train/000/model.ckpt.kalman.npz of the trained "
            "model is missing") in out
    assert "put it back" in out and "it continues with post_train of iteration 0" in out
    assert records(root) == [(0, 0), (0, 1)]
    # put back: post_train and its calibration, then exploration starts
    shutil.move(tmp_path / "state.npz", state)
    run_until(root, (0, 3))
    calibration = train / "000" / "model.ckpt.kalman.calibration.json"
    fitted = json.loads(calibration.read_text())
    # exploration: the calibration the tasks would read is damaged; no job goes out with it
    calibration.write_text(calibration.read_text()[:100])
    rc, out = run_to_end(root)
    assert rc != 0 and "Traceback" not in out, out[-3000:]
    assert f"alkpu run: error: the KPU calibration {calibration} is damaged" in out
    assert "it continues with run_model_devi of iteration 0" in out
    assert records(root)[-1] == (0, 3)
    # the documented fix: delete it; the run fits it again (the same fit) and goes on to explore
    calibration.unlink()
    # an exploration job that keeps failing: one message naming the step, the task, its directory
    # and its log; record.dpgen keeps make_model_devi as the last finished step
    broken.touch()
    rc, out = run_to_end(root)
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    task = "iter.000000/01.model_devi/task.000.000000"
    assert out.count("alkpu run: error:") == 1
    assert ("alkpu run: error: run_model_devi of iteration 0 stopped: 1 job(s) failed and were retried 1 "
            "time(s) (machine.json's retry_count):") in out
    remote = re.escape(str(root / "remote")) + r"/\w+/task.000.000000"
    assert re.search(rf"  task task.000.000000: `.*alkpu lmp-kpu .*` in {task} \(run in {remote}\); its log "
                     rf"{remote}/model_devi.log ends with:\n    simulated failure \(while {re.escape(str(broken))}\)",
                     out), out[-3000:]
    assert "so it continues with run_model_devi of iteration 0; jobs that finished are not run again" in out
    assert records(root)[-1] == (0, 3)
    # the cause fixed: the same command goes on from there
    broken.unlink()
    rc, out = run_to_end(root)
    assert rc == 0, out[-5000:]
    assert json.loads(calibration.read_text())["a"] == pytest.approx(fitted["a"], rel=1e-9)
    done = records(root)
    assert done[-1] == (1, 2) and done == sorted(set(done))
    assert (train / "000" / "frozen_model.pb").stat().st_mtime_ns == frozen  # training not redone
    assert not list(root.glob("iter.*.bk*")) and not list(root.glob("iter.*/*.bk*"))  # nothing moved aside
    table = np.loadtxt(root / "iter.000000" / "01.model_devi" / "task.000.000000" / "model_devi.out", ndmin=2)
    assert len(table) == 6 and np.all(table[:, 4] < 49.0)
    assert (root / "iter.000001" / "00.train" / "000").is_symlink()  # no new labels: model kept
