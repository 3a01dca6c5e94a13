"""Run DP-GEN's own `dpgen` command (dpgen.main.main, what the console script calls) with
Python's and NumPy's generators seeded, so that two runs can be compared file by file.

    python tests/dpgen_launch.py [--seed N] [--check-interval S] run param.json machine.json

``--check-interval`` makes dpdispatcher poll every S seconds (DP-GEN's run has no such
setting; its default is 30 s). With ``PYTHONPATH=tests/without_plugin`` the process and its
jobs run as if alkpu-plugin were not installed (tests/without_plugin/sitecustomize.py).
"""

import sys


def main(argv):
    seed, interval = None, None
    while argv and argv[0].startswith("--"):
        flag = argv.pop(0)
        if flag == "--seed":
            seed = int(argv.pop(0))
        elif flag == "--check-interval":
            interval = float(argv.pop(0))
        else:
            raise SystemExit(f"unknown option {flag}")
    from dpgen.main import main as dpgen_main  # imports dpgen, then dpdata (and its plugins)

    if interval is not None:
        from dpdispatcher import Submission

        run_submission = Submission.run_submission

        def polled(self, *args, **kwargs):
            kwargs.setdefault("check_interval", interval)
            return run_submission(self, *args, **kwargs)

        Submission.run_submission = polled
    if seed is not None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
    sys.argv = ["dpgen", *argv]
    return dpgen_main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
