"""Does one model's KPU rank hot frames by their error as well as the committee's deviation?

Uses the models of a label-efficiency run (``bench_label_efficiency.py``: run it first). For
every round r >= 1 and seed, on the validation frames of every rung (1200 K and 1400 K
pooled, never trained on):

* KPU: the max per-atom KPU of the RLEKF model of the ``kpu-atom`` strategy in round r,
  against that model's true max atomic force error;
* committee: DP-GEN's max force deviation of the four Adam models of the ``committee``
  strategy in round r (max over atoms of sqrt(mean over models |F_m - <F>|^2)), against the
  true max atomic force error of model 0 (the model DP-GEN explores with).

Beside the max per-atom KPU, variants that could rank better are scored the same way:

* ``per-species``: each atom's KPU divided by the mean per-atom KPU of its species on the
  model's initial training frames (frames every round trained on), so that a species whose
  atoms carry larger KPU everywhere does not dominate the max;
* ``energy``: the frame's energy KPU;
* ``energy+force``: the sum of the per-species force value above and the energy KPU divided by
  its mean on the same training frames.

(A factor λ or an added noise term, as in the predictive variance λ + gᵀPg, leaves every
ranking unchanged and is not scored.)

Spearman rank correlation per model; results in ``OUT/ranking_<system>.json`` and a table.

    .venv/bin/python benchmarks/bench_ranking.py [--work benchmarks/out/label_efficiency/work/Cu-...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from bench_kpu_quality import spearman  # noqa: E402


def _max_error(forces, labels):
    return np.sqrt(((forces - labels) ** 2).sum(axis=-1)).max(axis=1)


def main() -> None:
    import dpdata
    from deepmd.infer import DeepPot

    from alkpu_plugin.kpu_engine import KPUEngine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="a label-efficiency work folder (default: the newest)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "label_efficiency")
    args = ap.parse_args()
    work = args.work or max((ROOT / "benchmarks" / "out" / "label_efficiency" / "work").glob("*-*"),
                            key=lambda p: p.stat().st_mtime)
    hot = None
    for path in sorted((work / "data" / "valid").glob("valid-*K")):
        s = dpdata.LabeledSystem(str(path), fmt="deepmd/npy")
        hot = s if hot is None else hot + s
    coords, cells = hot["coords"], hot["cells"]
    init = None
    labels = hot["forces"]
    results = []
    for seed_dir in sorted(work.glob("seed*")):
        init = dpdata.LabeledSystem(str(work / "data" / seed_dir.name / "init"), fmt="deepmd/npy")
        for rdir in sorted((seed_dir / "kpu-atom").glob("round*")):
            r = rdir.name
            graph = rdir / "rlekf" / "graph.pb"
            members = [seed_dir / "committee" / r / f"adam{m}" / "graph.pb" for m in range(4)]
            if not graph.is_file() or not all(m.is_file() for m in members):
                continue
            engine = KPUEngine(graph, seed=0)
            result = engine.compute(hot, progress=False)
            atype = engine.jacobian.types_for(hot["atom_names"], hot["atom_types"])
            atom_kpu = np.asarray(result.atom_kpu)
            kpu = atom_kpu.max(axis=1)
            ref = engine.compute(init, progress=False)
            ref_types = engine.jacobian.types_for(init["atom_names"], init["atom_types"])
            ref_atom = np.asarray(ref.atom_kpu)
            scale = np.ones(int(atype.max()) + 1)
            for t in range(scale.size):
                if np.any(ref_types == t):
                    scale[t] = ref_atom[:, ref_types == t].mean()
            per_species = (atom_kpu / scale[atype][None, :]).max(axis=1)
            energy = np.asarray(result.energy_kpu)
            combined = per_species + energy / np.asarray(ref.energy_kpu).mean()
            forces = np.array([engine.jacobian.predict(f)[1] for f in engine._frames(hot, None)[1]])
            engine.jacobian.close()
            committee = []
            for m in members:
                _, f, _ = DeepPot(str(m)).eval(coords.reshape(len(coords), -1), cells.reshape(len(cells), -1),
                                               atype.tolist())
                committee.append(f.reshape(labels.shape))
            committee = np.array(committee)
            deviation = np.sqrt(((committee - committee.mean(axis=0)) ** 2).sum(axis=-1).mean(axis=0)).max(axis=1)
            error = _max_error(forces, labels)
            entry = {"seed": seed_dir.name, "round": int(r[5:]),
                     "kpu_spearman": spearman(kpu, error),
                     "per_species_spearman": spearman(per_species, error),
                     "energy_spearman": spearman(energy, error),
                     "energy_force_spearman": spearman(combined, error),
                     "committee_spearman": spearman(deviation, _max_error(committee[0], labels)),
                     "rlekf_force_rmse": float(np.sqrt(((forces - labels) ** 2).mean())),
                     "adam0_force_rmse": float(np.sqrt(((committee[0] - labels) ** 2).mean()))}
            results.append(entry)
            print(json.dumps(entry), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ranking_{work.name.split('-')[0]}.json").write_text(json.dumps(
        {"work": str(work), "frames": int(len(coords)), "results": results}, indent=1))
    print("| uncertainty | Spearman with the max force error, median [min-max] | models |\n| --- | --- | ---: |")
    for key, name in (("kpu", "KPU, max per atom (one RLEKF model)"),
                      ("per_species", "KPU, max per atom over its species' training mean"),
                      ("energy", "KPU of the energy"), ("energy_force", "energy + per-species force KPU"),
                      ("committee", "committee max deviation (four Adam models)")):
        v = np.array([e[f"{key}_spearman"] for e in results])
        print(f"| {name} | {np.median(v):.2f} [{v.min():.2f}-{v.max():.2f}] | {v.size} |")


if __name__ == "__main__":
    main()
