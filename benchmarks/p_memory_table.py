"""P's memory for a model at several blocksizes and both p_dtypes (the table of docs/memory.md).

    python benchmarks/p_memory_table.py                   # the DP-GEN-size Cu model below
    python benchmarks/p_memory_table.py --axis-neuron 4   # the same with DeePMD-kit's default axis_neuron
    python benchmarks/p_memory_table.py input.json        # the model section of a DeePMD-kit input

Weights are counted from the model section (alkpu_plugin.dpgen.model_size, se_e2_a +
ener fitting), P's size from the block layout (alkpu_plugin.kalman.budget); nothing is
built or allocated.  The step time is budget.py's estimate (bytes of P x (1 +
force_updates) at ~30 GB/s), not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import json

from alkpu_plugin.dpgen.model_size import model_tensors
from alkpu_plugin.kalman import BlockLayout
from alkpu_plugin.kalman.budget import BANDWIDTH, ITEMSIZE, passes_per_update

# a DP-GEN-size one-species model: se_e2_a embedding [25, 50, 100], axis_neuron 12,
# fitting [240, 240, 240] (DeePMD-kit's defaults for the rest: fitting resnet_dt true)
MODEL = {
    "type_map": ["Cu"],
    "descriptor": {"type": "se_e2_a", "sel": [90], "rcut_smth": 0.5, "rcut": 6.0,
                   "neuron": [25, 50, 100], "axis_neuron": 12},
    "fitting_net": {"neuron": [240, 240, 240]},
}
BLOCKSIZES = (10240, 5120, 2048, 1024, 512)
LIMIT = 2e9
FORCE_UPDATES = 4


def rows(model: dict = MODEL, blocksizes=BLOCKSIZES, limit: float = LIMIT) -> list[dict]:
    """One row per (blocksize, p_dtype): weights, blocks, bytes of P, fits the limit, step estimate."""
    tensors = model_tensors(model)
    out = []
    for bs in blocksizes:
        layout = BlockLayout.build(tensors, bs)
        for dtype, size in ITEMSIZE.items():
            nbytes = layout.nbytes_p * size
            out.append({
                "blocksize": bs, "p_dtype": dtype, "weights": layout.n, "blocks": len(layout.blocks),
                "p_bytes": nbytes, "fits_2gb": nbytes <= limit,
                "step_s": passes_per_update(dtype) * nbytes * (1 + FORCE_UPDATES) / BANDWIDTH,
            })
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", help="a DeePMD-kit input whose model section is used")
    parser.add_argument("--axis-neuron", type=int, help="override the descriptor's axis_neuron")
    args = parser.parse_args(argv)
    model = copy.deepcopy(MODEL)
    if args.input:
        with open(args.input) as fh:
            model = json.load(fh)["model"]
    if args.axis_neuron:
        model["descriptor"]["axis_neuron"] = args.axis_neuron
    table = rows(model)
    print(f"{table[0]['weights']} weights\n")
    print("| blocksize | blocks | P float64 (GB) | P float32 (GB) | <= 2 GB | Kalman s/step, estimate (f64 / f32) |")
    print("| ---: | ---: | ---: | ---: | --- | ---: |")
    for i in range(0, len(table), 2):
        f64, f32 = table[i], table[i + 1]
        fits = "both" if f64["fits_2gb"] else ("float32 only" if f32["fits_2gb"] else "no")
        print(f"| {f64['blocksize']} | {f64['blocks']} | {f64['p_bytes'] / 1e9:.2f} | "
              f"{f32['p_bytes'] / 1e9:.2f} | {fits} | {f64['step_s']:.2f} / {f32['step_s']:.2f} |")


if __name__ == "__main__":
    main()
