"""Label efficiency, pool-based: how fast does each selection strategy lower the validation error
per label spent?

Pool: EMT molecular-dynamics frames along a temperature ladder (default 300, 600, 900, 1200 K),
all labelled up front (energy, forces, virial) but shown to a strategy only as coordinates; a
frame's labels are added to the training data when the strategy selects it. Validation: EMT MD
frames at 1200 K and 1400 K (other seeds, never in the pool), the same for every seed.

A run (one strategy, one seed) starts from a small labelled 300 K set (``--init-frames``), then
repeats ``--rounds`` times: train, freeze, select ``--k`` frames from the unlabelled pool, add
their labels; a last training follows the last selection. Every trained model is evaluated on
the validation sets.

Strategies (``--strategies``):

* ``random``: k unlabelled frames drawn at random;
* ``kpu-frame``: the k largest of the paper's frame force KPU (``KPUResult.force_kpu``);
* ``kpu-atom``: the k largest of the max per-atom KPU (``KPUResult.atom_kpu``);
* ``diverse``: a greedy batch by virtual Kalman updates
  (:func:`alkpu_plugin.kalman.diverse_batch.greedy_batch` on the Gram matrix
  :func:`~alkpu_plugin.kalman.diverse_batch.gram` of each candidate's most uncertain atom's
  three force rows, the ``--diverse-candidates`` frames of largest max per-atom KPU entering
  the choice; noise from the KPU calibration as ``alkpu run``'s ``"selection": "diverse"``
  takes it, :class:`alkpu_plugin.dpgen.diverse.DiverseChooser`);
* ``committee``: DP-GEN's baseline: four models trained with Adam from different seeds, the k
  largest max force deviations (max over atoms of sqrt(mean over models |F_m - <F>|^2)).

Two diagnostics, not selection rules (they read what no strategy can know; not run unless named):

* ``oracle``: the k frames of largest true max atomic force error of the round's model (the
  pool's hidden labels): what a perfect ranking by error would pick, greedily;
* ``hottest``: k frames drawn at random from the hottest rung of the pool (its temperature is
  hidden from the other strategies): how much of a choice's gain a prior "hot frames teach
  most" already gives.

The four RLEKF strategies train one model with ``"optimizer": {"type": "RLEKF"}`` through the
real ``dp train``; round 0 trains ``--init-steps`` steps (it is the same for the four strategies
of a seed and trained once), later rounds ``--steps`` steps continuing the previous round's
model and Kalman state (``dp train --init-model PREV/model.ckpt``, the state found beside the
checkpoint), as ``alkpu run`` continues an iteration (``training_reuse_iter``). The KPU
strategies fit the KPU calibration on up to 24 training frames each round, as ``alkpu run``
does after training. The committee's Adam models are trained from scratch in round 0
(``--adam-steps``) and continued in later rounds (``--adam-reuse-steps``, ``dp train
--init-model`` with DP-GEN's ``training_reuse_*`` learning rate and loss prefactors, the
example's ``training_reuse_start_lr``); their ``lcurve.out`` columns and their force RMSE on the
whole training set are recorded so that convergence can be checked. The committee's
validation error is that of model 0 (DP-GEN explores with model 0); the error of the committee
mean is recorded too, and the committee's labelled frames are also learnt by an RLEKF model
trained as the other strategies train theirs ("committee data, RLEKF model"), which separates
the choice of frames from the optimizer.

Model and RLEKF blocksize are the examples' (``examples/cu-emt/param.json`` for ``Cu``, a
32-atom fcc cell; ``examples/cuni-emt/param.json`` for ``CuNi``, a 32-atom fcc cell with half of
the sites, drawn per data set, holding Ni).

Recorded per strategy, seed and round: labels used, validation force RMSE and energy RMSE per
atom at each validation temperature, training-set force RMSE beside the RMS of the label forces
(RLEKF's initial plateau shows as a ratio near 1), RLEKF's own ``force_fit`` check, the
temperatures of the frames selected, wall seconds per stage. Results:
``OUT/<system>.json``, ``OUT/<system>.png`` (force RMSE against labels, mean and min/max over
seeds, one panel per validation temperature), and the working files under ``OUT/work/``
(a finished round is not recomputed; delete its folder to redo it).

    .venv/bin/python benchmarks/bench_label_efficiency.py --system Cu --seeds 0,1,2
    .venv/bin/python benchmarks/bench_label_efficiency.py --system Cu --table

Subprocesses get one OpenMP / TensorFlow / BLAS thread unless the environment says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
THREAD_VARS = ("OMP_NUM_THREADS", "TF_INTRA_OP_PARALLELISM_THREADS", "TF_INTER_OP_PARALLELISM_THREADS",
               "DP_INTRA_OP_PARALLELISM_THREADS", "DP_INTER_OP_PARALLELISM_THREADS",
               "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
for _var in THREAD_VARS:
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ENV = dict(os.environ)

STRATEGIES = ("random", "kpu-frame", "kpu-atom", "diverse", "committee")
DIAGNOSTICS = ("oracle", "hottest")
KPU_STRATEGIES = ("kpu-frame", "kpu-atom", "diverse")
COMMITTEE_SIZE = 4

SYSTEMS = {
    "Cu": {"param": "examples/cu-emt/param.json", "type_map": ["Cu"],
           "frames": {"element": "Cu", "size": 2, "a": 3.61}},
    "CuNi": {"param": "examples/cuni-emt/param.json", "type_map": ["Cu", "Ni"],
             "frames": {"element": "Cu", "size": 2, "a": 3.56, "substitute": {"Ni": 0.5}}},
}

# rough costs on one shared core (32-atom cells, the examples' models), for the printed estimate
COST = {"dp_start_s": 4.5, "freeze_s": 4.3, "rlekf_step_s": 0.028, "adam_step_s": 0.0028,
        "engine_s": 2.5, "kpu_frame_s": 0.04, "eval_model_s": 0.5}


# ------------------------------------------------------------------ configuration
def config_of(args) -> dict:
    """Everything that changes the numbers of a run (the working folder is named by its hash)."""
    return {
        "system": args.system, "temps": [float(t) for t in args.temps.split(",")],
        "pool_per_temp": args.pool_per_temp, "pool_interval": args.pool_interval,
        "init_frames": args.init_frames, "valid_temps": [float(t) for t in args.valid_temps.split(",")],
        "valid_frames": args.valid_frames, "rounds": args.rounds, "k": args.k,
        "init_steps": args.init_steps, "steps": args.steps, "adam_steps": args.adam_steps,
        "adam_reuse_steps": args.adam_reuse_steps,
        "diverse_candidates": args.diverse_candidates,
        "rlekf": rlekf_keys(args.system),
    }


def rlekf_keys(system: str) -> dict:
    """The RLEKF strategies' optimizer keys with the plugin's defaults filled in, so that a change
    of the defaults names another working folder."""
    from alkpu_plugin.deepmd_tf.schema import RLEKFSettings

    _, optimizer = training_input(system)
    keys = RLEKFSettings.from_optimizer(optimizer).to_dict()
    return {k: v for k, v in keys.items() if v is not None}


def tag_of(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def training_input(system: str) -> tuple[dict, dict]:
    """The example's DeePMD training input (model, learning rate, loss) and its RLEKF optimizer keys."""
    param = json.loads((ROOT / SYSTEMS[system]["param"]).read_text())
    train = copy.deepcopy(param["default_training_param"])
    train["model"]["type_map"] = list(SYSTEMS[system]["type_map"])
    optimizer = {"type": "RLEKF", **param.get("kpu", {}).get("optimizer", {})}
    return train, optimizer


def adam_reuse_keys(system: str) -> dict:
    """What DP-GEN changes when it continues a model (training_reuse_*): the example's start_lr
    (DP-GEN's default 1e-4 if it sets none) and DP-GEN's default start prefactors."""
    param = json.loads((ROOT / SYSTEMS[system]["param"]).read_text())
    return {"start_lr": param.get("training_reuse_start_lr", 1e-4),
            "start_pref_e": param.get("training_reuse_start_pref_e", 0.1),
            "start_pref_f": param.get("training_reuse_start_pref_f", 100)}


# ------------------------------------------------------------------------- data
def make_data(config: dict, seed: int, data_dir: Path) -> dict:
    """Pool, initial set and validation sets as deepmd/npy folders (made once, then read).

    The pool and the initial set depend on the seed; the validation sets do not.
    """
    from alkpu_plugin.reference import md_frames

    spec = SYSTEMS[config["system"]]
    kw = {**spec["frames"], "type_map": spec["type_map"]}
    sets = {}
    for i, temp in enumerate(config["temps"]):
        sets[f"pool-{temp:g}K"] = dict(temperature=temp, nframes=config["pool_per_temp"],
                                       interval=config["pool_interval"], seed=1000 * (seed + 1) + i)
    sets["init"] = dict(temperature=config["temps"][0], nframes=config["init_frames"], interval=20,
                        seed=1000 * (seed + 1) + 99)
    for i, temp in enumerate(config["valid_temps"]):
        sets[f"valid-{temp:g}K"] = dict(temperature=temp, nframes=config["valid_frames"], interval=20,
                                        seed=7001 + i)
    paths = {}
    for name, opts in sets.items():
        where = data_dir / ("valid" if name.startswith("valid") else f"seed{seed}") / name
        if not (where / "type.raw").exists():
            md_frames(opts.pop("temperature"), opts.pop("nframes"), **opts, **kw).to("deepmd/npy", str(where))
        paths[name] = where
    return paths


def load(path: Path):
    import dpdata

    return dpdata.LabeledSystem(str(path), fmt="deepmd/npy")


def coordinates_only(labelled):
    """The frames without their labels: what a strategy sees of the unlabelled pool."""
    import dpdata

    system = dpdata.System()
    system.data = {key: copy.deepcopy(labelled.data[key])
                   for key in ("atom_names", "atom_numbs", "atom_types", "orig", "cells", "coords", "nopbc")
                   if key in labelled.data}
    return system


# ------------------------------------------------------------------- training
def run_dp(args: list[str], cwd: Path) -> None:
    with open(cwd / "dp.log", "a") as log:
        proc = subprocess.run([str(BIN / "dp"), *args], cwd=cwd, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = (cwd / "dp.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"dp {' '.join(args)} failed in {cwd}:\n" + "\n".join(tail))


def train(run: Path, config: dict, systems: list[Path], *, optimizer: dict, steps: int, seed: int,
          init_model: Path | None = None, reuse: dict | None = None) -> dict:
    """`dp train` and `dp freeze` in ``run``; returns wall seconds (kept beside the graph).

    ``reuse``: learning-rate and loss keys that replace the example's (an Adam model continued).
    """
    done = run / "train_times.json"
    if (run / "graph.pb").exists() and done.exists():
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    cfg, _ = training_input(config["system"])
    for part in ("descriptor", "fitting_net"):
        cfg["model"][part]["seed"] = seed
    cfg["optimizer"] = optimizer
    cfg["training"] = {"training_data": {"systems": [str(p) for p in systems], "batch_size": 1},
                       "numb_steps": steps, "disp_freq": max(1, steps // 20), "save_freq": steps,
                       "seed": seed}
    if optimizer["type"] == "Adam":
        cfg["learning_rate"]["decay_steps"] = max(1, steps // 20)
        for key, value in (reuse or {}).items():
            cfg["learning_rate" if key == "start_lr" else "loss"][key] = value
    (run / "input.json").write_text(json.dumps(cfg, indent=1))
    tic = time.time()
    run_dp(["train", "input.json"] + (["--init-model", str(init_model)] if init_model else []), run)
    times = {"train_s": time.time() - tic}
    tic = time.time()
    run_dp(["freeze", "-o", "graph.pb"], run)
    times["freeze_s"] = time.time() - tic
    done.write_text(json.dumps(times))
    return times


def lcurve(run: Path) -> dict:
    """The lcurve.out columns step, rmse_e_trn, rmse_f_trn, lr, and the training force RMSE's trend."""
    data = np.loadtxt(run / "lcurve.out", ndmin=2)
    names = (run / "lcurve.out").read_text().splitlines()[0].lstrip("#").split()
    col = {n: data[:, i].tolist() for i, n in enumerate(names) if n in ("step", "rmse_e_trn", "rmse_f_trn", "lr")}
    f = np.asarray(col.get("rmse_f_trn", []))
    if f.size >= 10:
        fifth = f.size // 5
        col["rmse_f_trn_last_fifth_over_previous_fifth"] = float(f[-fifth:].mean() / f[-2 * fifth:-fifth].mean())
    return col


# ------------------------------------------------------------------ evaluation
_POTS: dict = {}


def predict(graph: Path, system) -> tuple[np.ndarray, np.ndarray]:
    """Energies (F,) and forces (F, N, 3) of a frozen model on a dpdata system."""
    from deepmd.infer import DeepPot

    key = str(Path(graph).resolve())
    if key not in _POTS:
        if len(_POTS) > COMMITTEE_SIZE:  # one round's models at a time
            del _POTS[next(iter(_POTS))]
        _POTS[key] = DeepPot(key)
    pot = _POTS[key]
    nframes = system.get_nframes()
    cells = None if system.nopbc else system["cells"].reshape(nframes, 9)
    e, f, _ = pot.eval(system["coords"].reshape(nframes, -1), cells, system["atom_types"])
    return np.asarray(e).reshape(nframes), np.asarray(f).reshape(nframes, -1, 3)


def errors(energy, forces, labelled) -> dict:
    natoms = labelled.get_natoms()
    return {"force_rmse": float(np.sqrt(np.mean((forces - labelled["forces"]) ** 2))),
            "energy_rmse_per_atom": float(np.sqrt(np.mean(((energy - labelled["energies"]) / natoms) ** 2)))}


def label_force_rms(systems) -> float:
    return float(np.sqrt(np.mean(np.concatenate([s["forces"].ravel() for s in systems]) ** 2)))


# ------------------------------------------------------------------- selection
def top_k(values: np.ndarray, eligible: np.ndarray, k: int) -> list[int]:
    idx = np.flatnonzero(eligible)
    return [int(i) for i in idx[np.argsort(-values[idx], kind="stable")[:k]]]


def calibrated_engine(graph: Path, train_sets: list, seed: int, rnd: int):
    """The KPU engine of a model, calibrated on up to 24 of its training frames (768 atoms),
    as ``alkpu run`` calibrates after training."""
    from alkpu_plugin.calibration import fit, force_errors
    from alkpu_plugin.kpu_engine import KPUEngine

    engine = KPUEngine(graph, seed=0, virial=False)
    rng = np.random.default_rng([seed, rnd, 11])
    frames = [(i, f) for i, s in enumerate(train_sets) for f in range(s.get_nframes())]
    order = rng.permutation(len(frames))[:24]
    atoms = np.cumsum([train_sets[frames[j][0]].get_natoms() for j in order])
    picked = sorted(frames[j] for j in order[: int(np.searchsorted(atoms, 768)) + 1])
    kpus, errs = [], []
    for i, system in enumerate(train_sets):
        mine = [f for j, f in picked if j == i]
        if mine:
            result = engine.compute(system, frames=mine, progress=False)
            kpus.append(result.atom_kpu.ravel())
            errs.append(force_errors(engine, system, result).ravel())
    engine.calibration = fit(np.concatenate(kpus), np.concatenate(errs))
    return engine


def select_kpu(strategy: str, engine, pool: list, labelled: list[np.ndarray], k: int,
               candidates: int) -> dict:
    """k frames of the unlabelled pool by KPU (pool: coordinates-only systems, one per source)."""
    from alkpu_plugin.dpgen.diverse import DiverseChooser
    from alkpu_plugin.kalman.diverse_batch import gram, greedy_batch

    results = [engine.compute(system, progress=False) for system in pool]
    where = [(s, f) for s, system in enumerate(pool) for f in range(system.get_nframes())]
    eligible = ~np.concatenate(labelled) & ~np.concatenate([r.out_of_domain for r in results])
    atom_kpu = np.concatenate([r.atom_kpu for r in results])
    frame_max = atom_kpu.max(axis=1)
    info = {"out_of_domain": int(sum(r.out_of_domain.sum() for r in results))}
    if strategy == "kpu-frame":
        chosen = top_k(np.concatenate([r.force_kpu for r in results]), eligible, k)
    elif strategy == "kpu-atom":
        chosen = top_k(frame_max, eligible, k)
    else:  # diverse
        cand = top_k(frame_max, eligible, candidates)
        rows = []
        for g in cand:
            s, f = where[g]
            _, frames = engine._frames(pool[s], [f])
            atom = int(np.argmax(atom_kpu[g]))
            rows.append(engine.jacobian.force_rows(frames[0], np.arange(3 * atom, 3 * atom + 3)))
        K = gram(engine.kf, np.vstack(rows))
        chooser = DiverseChooser(0, {}, {}, Path("."), Path("."))
        chooser._engine = engine  # its noise rule reads the engine's calibration
        noise, source = chooser._noise(K)
        batch = greedy_batch(K, [np.arange(3 * n, 3 * n + 3) for n in range(len(cand))], k, noise)
        chosen = [cand[f] for f in batch.frames]
        info.update(noise=noise, noise_from=source, gains=batch.gains, kpu_when_chosen=batch.kpu,
                    repeats_skipped=len(batch.redundant), candidates=len(cand))
        if len(chosen) < k:  # fewer new directions than k: the rest by max per-atom KPU
            rest = eligible.copy()
            rest[chosen] = False
            chosen += top_k(frame_max, rest, k - len(chosen))
    info["value_of_chosen"] = [float(frame_max[g]) for g in chosen]
    info["calibration"] = {key: engine.calibration[key] for key in ("a", "b")}
    return {"chosen": chosen, **info}


def select_committee(graphs: list[Path], pool: list, labelled: list[np.ndarray], k: int) -> dict:
    devi = []
    for system in pool:
        forces = np.array([predict(g, system)[1] for g in graphs])
        devi.append(np.sqrt(((forces - forces.mean(axis=0)) ** 2).sum(axis=3).mean(axis=0)).max(axis=1))
    devi = np.concatenate(devi)
    chosen = top_k(devi, ~np.concatenate(labelled), k)
    return {"chosen": chosen, "value_of_chosen": [float(devi[g]) for g in chosen]}


def select_oracle(graph: Path, pool_labelled: list, labelled: list[np.ndarray], k: int) -> dict:
    """The k unlabelled frames of largest true max atomic force error (reads the hidden labels)."""
    err = np.concatenate([np.linalg.norm(predict(graph, s)[1] - s["forces"], axis=2).max(axis=1)
                          for s in pool_labelled])
    chosen = top_k(err, ~np.concatenate(labelled), k)
    return {"chosen": chosen, "value_of_chosen": [float(err[g]) for g in chosen]}


# ----------------------------------------------------------------------- a run
def rlekf_round(rnd: int, seed: int, config: dict, work: Path, runs: Path, rdir: Path, systems: list[Path],
                train_sets: list, valid: dict, optimizer: dict) -> dict:
    """Train (round 0: shared by the strategies of a seed; later: continuing the previous round's
    model and Kalman state), freeze and evaluate one round's RLEKF model."""
    from alkpu_plugin.kalman import read_meta

    record = {}
    if rnd == 0:  # the same for every strategy of this seed: trained once
        tdir = work / f"seed{seed}" / "rlekf-round000"
        record["shared_training"] = True
        times = train(tdir, config, systems, optimizer=optimizer, steps=config["init_steps"], seed=seed)
    else:
        tdir = rdir / "rlekf"
        prev = work / f"seed{seed}" / "rlekf-round000" if rnd == 1 else runs / f"round{rnd - 1:03d}" / "rlekf"
        times = train(tdir, config, systems, optimizer=optimizer, steps=config["steps"], seed=seed,
                      init_model=prev / "model.ckpt")
    times = dict(times)
    graph = tdir / "graph.pb"
    record["force_fit"] = (read_meta(tdir / "model.ckpt.kalman.npz").get("extra") or {}).get("force_fit")
    t0 = time.time()
    record["train_force_rmse"] = float(np.sqrt(np.mean(np.concatenate(
        [(predict(graph, s)[1] - s["forces"]).ravel() for s in train_sets]) ** 2)))
    record["valid"] = {t: errors(*predict(graph, s), s) for t, s in valid.items()}
    times["eval_s"] = time.time() - t0
    return {"record": record, "times": times, "graph": graph}


def run_one(strategy: str, seed: int, config: dict, work: Path, load_only: bool = False) -> dict:
    """One strategy, one seed: every round's record (each round's record is kept on disk;
    ``load_only``: read the records of a finished run)."""

    paths = make_data(config, seed, work / "data")
    pool_names = [n for n in paths if n.startswith("pool-")]
    pool_labelled = [load(paths[n]) for n in pool_names]
    pool = [coordinates_only(s) for s in pool_labelled]
    valid = {n[len("valid-"):]: load(paths[n]) for n in paths if n.startswith("valid-")}
    valid_rms = {t: label_force_rms([s]) for t, s in valid.items()}
    init = load(paths["init"])
    labelled = [np.zeros(s.get_nframes(), bool) for s in pool]
    where = [(s, f) for s, system in enumerate(pool) for f in range(system.get_nframes())]
    _, optimizer = training_input(config["system"])
    runs = work / f"seed{seed}" / strategy
    records = []
    for rnd in range(config["rounds"] + 1):
        rdir = runs / f"round{rnd:03d}"
        saved = rdir / "record.json"
        if saved.exists():
            record = json.loads(saved.read_text())
            for g in record.get("selected", []):
                s, f = where[g]
                labelled[s][f] = True
            records.append(record)
            continue
        if load_only:
            raise RuntimeError(f"{strategy}, seed {seed}: round {rnd} has no record in {rdir}")
        tic = time.time()
        rdir.mkdir(parents=True, exist_ok=True)
        # the training data: the initial set and the labels revealed so far, one folder per source
        data_dir = rdir / "data"
        systems = [paths["init"]]
        train_sets = [init]
        for s, name in enumerate(pool_names):
            idx = np.flatnonzero(labelled[s])
            if idx.size:
                sub = pool_labelled[s].sub_system(idx)
                if not (data_dir / name / "type.raw").exists():
                    sub.to("deepmd/npy", str(data_dir / name))
                systems.append(data_dir / name)
                train_sets.append(sub)
        labels = sum(t.get_nframes() for t in train_sets)
        record = {"round": rnd, "labels": labels, "label_force_rms_train": label_force_rms(train_sets),
                  "labels_per_source": {"init": init.get_nframes(),
                                        **{n: int(m.sum()) for n, m in zip(pool_names, labelled)}}}
        times = {}
        if strategy == "committee":
            graphs = []
            members = []
            reuse = rnd > 0 and config["adam_reuse_steps"] > 0
            for m in range(COMMITTEE_SIZE):
                mdir = rdir / f"adam{m}"
                prev = runs / f"round{rnd - 1:03d}" / f"adam{m}" / "model.ckpt" if reuse else None
                t = train(mdir, config, systems, optimizer={"type": "Adam"},
                          steps=config["adam_reuse_steps"] if reuse else config["adam_steps"],
                          seed=1000 * seed + 100 + m, init_model=prev,
                          reuse=adam_reuse_keys(config["system"]) if reuse else None)
                for key, value in t.items():
                    times[key] = times.get(key, 0.0) + value
                graphs.append(mdir / "graph.pb")
                members.append({"lcurve": lcurve(mdir)})
            t0 = time.time()
            for member, graph in zip(members, graphs):
                member["train_force_rmse"] = float(np.sqrt(np.mean(np.concatenate(
                    [(predict(graph, s)[1] - s["forces"]).ravel() for s in train_sets]) ** 2)))
            record["committee"] = members
            record["train_force_rmse"] = members[0]["train_force_rmse"]
            preds = {t: [predict(g, s) for g in graphs] for t, s in valid.items()}
            record["valid"] = {t: errors(*p[0], valid[t]) for t, p in preds.items()}
            record["valid_committee_mean"] = {
                t: errors(np.mean([e for e, _ in p], axis=0), np.mean([f for _, f in p], axis=0), valid[t])
                for t, p in preds.items()}
            times["eval_s"] = time.time() - t0
            # the committee's data, learnt by an RLEKF model as the other strategies learn theirs
            rl = rlekf_round(rnd, seed, config, work, runs, rdir, systems, train_sets, valid, optimizer)
            record["rlekf_model"] = rl["record"]
            for key, value in rl["times"].items():
                times[f"rlekf_{key}"] = value
            if rnd < config["rounds"]:
                t0 = time.time()
                sel = select_committee(graphs, pool, labelled, config["k"])
                times["select_s"] = time.time() - t0
        else:
            rl = rlekf_round(rnd, seed, config, work, runs, rdir, systems, train_sets, valid, optimizer)
            record.update(rl["record"])
            times.update(rl["times"])
            graph = rl["graph"]
            if rnd < config["rounds"]:
                t0 = time.time()
                if strategy in ("random", "hottest"):
                    rng = np.random.default_rng([seed, rnd, 5])
                    free = ~np.concatenate(labelled)
                    if strategy == "hottest":
                        hot = int(np.argmax(config["temps"]))
                        free &= np.array([s == hot for s, _ in where])
                    free = np.flatnonzero(free)
                    sel = {"chosen": sorted(int(g) for g in rng.choice(free, size=min(config["k"], free.size),
                                                                          replace=False))}
                elif strategy == "oracle":
                    sel = select_oracle(graph, pool_labelled, labelled, config["k"])
                else:
                    engine = calibrated_engine(graph, train_sets, seed, rnd)
                    try:
                        sel = select_kpu(strategy, engine, pool, labelled, config["k"],
                                         config["diverse_candidates"])
                    finally:
                        engine.jacobian.close()
                times["select_s"] = time.time() - t0
        record["train_force_rmse_over_label_rms"] = record["train_force_rmse"] / record["label_force_rms_train"]
        record["valid_label_force_rms"] = valid_rms
        if rnd < config["rounds"]:
            chosen = sel.pop("chosen")
            record["selected"] = chosen
            record["selected_temps"] = [pool_names[where[g][0]][len("pool-"):] for g in chosen]
            record["selection"] = sel
            for g in chosen:
                s, f = where[g]
                labelled[s][f] = True
        times["total_s"] = time.time() - tic
        record["wall_s"] = times
        saved.write_text(json.dumps(record, indent=1))
        v = record["valid"]
        print(f"  {strategy} seed {seed} round {rnd}: {labels} labels, force RMSE "
              + ", ".join(f"{t} {x['force_rmse']:.4f}" for t, x in v.items())
              + f" eV/A (train {record['train_force_rmse']:.3f} = "
              f"{record['train_force_rmse_over_label_rms']:.2f} x label RMS), {times['total_s']:.0f} s", flush=True)
        records.append(record)
    return {"strategy": strategy, "seed": seed, "rounds": records}


# ------------------------------------------------------------------- estimate
def estimate_s(config: dict, strategies: list[str], nseeds: int) -> float:
    """Rough wall seconds of a run from the per-stage costs in COST (one shared core)."""
    c = COST
    pool = config["pool_per_temp"] * len(config["temps"])
    rounds = config["rounds"]
    model = c["dp_start_s"] + c["freeze_s"] + c["eval_model_s"]
    rlekf = model + c["rlekf_step_s"] * config["steps"]
    kpu_select = c["engine_s"] + c["kpu_frame_s"] * (pool + 24)
    per_seed = model + c["rlekf_step_s"] * config["init_steps"]  # round 0's RLEKF model, shared
    for s in strategies:
        per_seed += rounds * rlekf + c["eval_model_s"]
        if s in KPU_STRATEGIES:
            per_seed += rounds * kpu_select
        if s == "committee":
            later = config["adam_reuse_steps"] or config["adam_steps"]
            per_seed += COMMITTEE_SIZE * (model + c["adam_step_s"] * config["adam_steps"])
            per_seed += rounds * COMMITTEE_SIZE * (model + c["adam_step_s"] * later)
    return nseeds * per_seed


# ------------------------------------------------------------------ reporting
def collect(runs: list[dict]) -> dict:
    out: dict = {}
    for run in runs:
        out.setdefault(run["strategy"], {})[str(run["seed"])] = run["rounds"]
    return out


def series(result: dict) -> dict:
    """Curve name -> per seed, the per-round records holding that curve's "valid" errors: one
    curve per strategy, and for the committee a second one, its data learnt by an RLEKF model."""
    out = {}
    for strategy, seeds in result["runs"].items():
        if strategy == "committee":
            out["committee (Adam model 0)"] = list(seeds.values())
            out["committee data, RLEKF model"] = [
                [{**r["rlekf_model"], "labels": r["labels"], "wall_s": r["wall_s"],
                  "label_force_rms_train": r["label_force_rms_train"]} for r in rounds]
                for rounds in seeds.values()]
        else:
            out[strategy] = list(seeds.values())
    return out


def curves(result: dict, temp: str, key: str = "force_rmse"):
    """Per curve: labels, and the mean / min / max over seeds of a validation error per round."""
    out = {}
    for name, per_seed in series(result).items():
        n = min(len(r) for r in per_seed)
        labels = [per_seed[0][i]["labels"] for i in range(n)]
        values = np.array([[r[i]["valid"][temp][key] for i in range(n)] for r in per_seed])
        out[name] = (labels, values.mean(axis=0), values.min(axis=0), values.max(axis=0))
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = list(result["valid_label_force_rms"])
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4.3), squeeze=False)
    for ax, temp in zip(axes[0], temps):
        for i, (name, (labels, mean, lo, hi)) in enumerate(curves(result, temp).items()):
            ax.plot(labels, mean, "o--" if "RLEKF model" in name else "o-", color=f"C{i}", label=name)
            ax.fill_between(labels, lo, hi, color=f"C{i}", alpha=0.15)
        ax.set(xlabel="labelled frames", ylabel="validation force RMSE (eV/Å)", yscale="log",
               title=f"{result['config']['system']}, validation at {temp} "
                     f"(label force RMS {result['valid_label_force_rms'][temp]:.2f} eV/Å)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    nseeds = max(len(s) for s in result["runs"].values())
    fig.suptitle(f"pool-based label efficiency: mean and min/max over {nseeds} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(result: dict) -> str:
    temps = list(result["valid_label_force_rms"])
    head = ["strategy", "round", "labels"]
    head += [f"F RMSE {t} (eV/Å)" for t in temps] + [f"E RMSE {t} (meV/atom)" for t in temps]
    head += ["train F RMSE / label RMS", "wall s (round, mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per_seed in series(result).items():
        n = min(len(r) for r in per_seed)
        for i in range(n):
            rows = [r[i] for r in per_seed]
            cells = [name, str(i), str(rows[0]["labels"])]
            for key, scale, fmt in (("force_rmse", 1.0, "{:.4f}"), ("energy_rmse_per_atom", 1e3, "{:.2f}")):
                for t in temps:
                    v = np.array([r["valid"][t][key] for r in rows]) * scale
                    cells.append(fmt.format(v.mean()) + ("" if v.size == 1 else
                                                         f" [{fmt.format(v.min())}–{fmt.format(v.max())}]"))
            cells.append(f"{np.mean([r['train_force_rmse'] / r['label_force_rms_train'] for r in rows]):.3f}")
            cells.append("(in the committee's)" if "RLEKF model" in name
                         else f"{np.mean([r['wall_s']['total_s'] for r in rows]):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    rms = ", ".join(f"{t}: {v:.3f} eV/Å" for t, v in result["valid_label_force_rms"].items())
    seeds = sorted({s for v in result["runs"].values() for s in v})
    lines.append("")
    lines.append(f"Label force RMS of the validation sets: {rms}. Seeds: {', '.join(seeds)}; [min–max] over "
                 "seeds. Wall s: the whole round (training, freezing, evaluation, selection); round 0's RLEKF "
                 "model is trained once per seed, by the first strategy that needs it.")
    return "\n".join(lines)


def compact(result: dict, temp: str) -> str:
    """Validation force RMSE at ``temp``: a row per label count, a column per curve (mean
    [min–max] over seeds), then the labels each curve needs to reach random choice's final mean
    error (linear interpolation between rounds; "> n" when it never does)."""
    cur = curves(result, temp)
    names = list(cur)
    labels = cur[names[0]][0]
    fmt = lambda m, lo, hi: f"{m:.3f}" if np.isclose(lo, hi) else f"{m:.3f} [{lo:.3f}–{hi:.3f}]"  # noqa: E731
    lines = ["| labels | " + " | ".join(names) + " |", "| ---: |" + " --- |" * len(names)]
    for i, n in enumerate(labels):
        lines.append(f"| {n} | " + " | ".join(fmt(cur[k][1][i], cur[k][2][i], cur[k][3][i]) if i < len(cur[k][0])
                                           else "" for k in names) + " |")
    if "random" in cur:
        target = cur["random"][1][-1]
        reach = []
        for k in names:
            lab, mean = np.asarray(cur[k][0], float), cur[k][1]
            below = np.flatnonzero(mean <= target)
            if not below.size:
                reach.append(f"> {int(lab[-1])}")
                continue
            j = below[0]
            if j == 0:
                reach.append(f"{lab[0]:.0f}")
                continue
            x = lab[j - 1] + (lab[j] - lab[j - 1]) * (mean[j - 1] - target) / (mean[j - 1] - mean[j])
            reach.append(f"{x:.0f}")
        lines.append(f"| labels to reach random's {int(labels[-1])}-label error ({target:.3f}) | "
                     + " | ".join(reach) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--system", choices=sorted(SYSTEMS), default="Cu")
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help="comma list of " + ", ".join(STRATEGIES) + " (diagnostics: " + ", ".join(DIAGNOSTICS) + ")")
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    ap.add_argument("--rounds", type=int, default=6, help="selection rounds (a training follows each)")
    ap.add_argument("--k", type=int, default=5, help="frames labelled per round")
    ap.add_argument("--temps", default="300,600,900,1200", help="temperature ladder of the pool (K)")
    ap.add_argument("--pool-per-temp", type=int, default=40, help="pool frames per temperature")
    ap.add_argument("--pool-interval", type=int, default=10, help="MD steps (2 fs) between pool frames")
    ap.add_argument("--init-frames", type=int, default=10, help="labelled frames at the first temperature to start from")
    ap.add_argument("--valid-temps", default="1200,1400")
    ap.add_argument("--valid-frames", type=int, default=30, help="validation frames per temperature")
    ap.add_argument("--init-steps", type=int, default=400, help="RLEKF steps of round 0")
    ap.add_argument("--steps", type=int, default=200, help="RLEKF steps of every later round (continued model and state)")
    ap.add_argument("--adam-steps", type=int, default=20000,
                    help="Adam steps of each committee model trained from scratch (round 0)")
    ap.add_argument("--adam-reuse-steps", type=int, default=5000,
                    help="Adam steps of the later rounds, continuing each committee model (0: from scratch, "
                         "--adam-steps, every round)")
    ap.add_argument("--diverse-candidates", type=int, default=200, help="most uncertain frames entering the diverse choice")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "label_efficiency"))
    ap.add_argument("--table", action="store_true", help="print the table of OUT/<system>.json, compute nothing")
    ap.add_argument("--estimate", action="store_true", help="print the time estimate and stop")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # STRATEGY:SEED, one run (started by the main process)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    result_path = out / f"{args.system}.json"
    if args.table:
        result = json.loads(result_path.read_text())
        print(table(result))
        for temp in result["valid_label_force_rms"]:
            print(f"\nValidation force RMSE at {temp} (eV/Å):\n")
            print(compact(result, temp))
        return 0
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES + DIAGNOSTICS]
    if unknown:
        ap.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES + DIAGNOSTICS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    config = config_of(args)
    work = out / "work" / f"{args.system}-{tag_of(config)}"
    if args.worker:
        strategy, seed = args.worker.split(":")
        run_one(strategy, int(seed), config, work)
        return 0
    est = estimate_s(config, strategies, len(seeds))
    print(f"{args.system}: {len(strategies)} strategies x {len(seeds)} seeds x {args.rounds + 1} trainings, pool "
          f"{args.pool_per_temp * len(config['temps'])} frames; estimated {est / 60:.0f} min on one shared core "
          f"(work: {work})", flush=True)
    if args.estimate:
        return 0
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(config, indent=1))
    tic = time.time()
    runs = []
    done = 0
    for seed in seeds:
        for strategy in strategies:
            print(f"{strategy}, seed {seed}", flush=True)
            t0 = time.time()
            # each run in its own process: the models it loads are freed when it ends
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:],
                            "--worker", f"{strategy}:{seed}"], env=ENV, check=True)
            runs.append(run_one(strategy, seed, config, work, load_only=True))
            done += 1
            spent = time.time() - tic
            print(f"  {strategy} seed {seed} done in {time.time() - t0:.0f} s; {spent / 60:.1f} min so far, "
                  f"about {spent / done * (len(seeds) * len(strategies) - done) / 60:.0f} min left", flush=True)
            result = {"config": config, "runs": collect(runs),
                      "valid_label_force_rms": runs[0]["rounds"][0]["valid_label_force_rms"],
                      "wall_s": time.time() - tic, "machine": {"cpus": os.cpu_count(),
                                                              "threads": {v: ENV.get(v) for v in THREAD_VARS}}}
            out.mkdir(parents=True, exist_ok=True)
            result_path.write_text(json.dumps(result, indent=1))
            plot(result, out / f"{args.system}.png")
    print(table(result))
    print(f"wrote {result_path} and {out / f'{args.system}.png'} ({(time.time() - tic) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
