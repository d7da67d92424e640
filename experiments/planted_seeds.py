"""The planted analysis of several training seeds in one file (varjax/assets/planted/seeds.json).

Each RUN_DIR is a planted run recorded from one seed's checkpoint (`experiments/planted.py
RUN_DIR --record --checkpoint SEED_DIR`); the seeds are named by the runs' order.

    python experiments/train_planted.py --out /tmp/seedS --seed S      # S = 1, 2, 3 (0: shipped)
    python experiments/planted.py /tmp/runS --record --checkpoint /tmp/seedS
    python experiments/planted_seeds.py /tmp/run0 /tmp/run1 /tmp/run2 /tmp/run3 --out seeds.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from varjax.analysis import analyze_planted, load_run
from varjax.analysis.planted import seed_entry
from varjax.errors import VarjaxError
from varjax.runfiles import atomic_write_text, stderr_log

WHAT = ("the planted analysis (experiments/planted.py) of models trained with the same recipe and training "
        "seeds {seeds} (data seed 0; seed 0 is the shipped model), each recorded as the default run does "
        "(8 random views, crop seed 0); the margins of tests/conftest.py hold for all")
REPRODUCE = ("python experiments/train_planted.py --out /tmp/seedS --seed S && python experiments/planted.py "
             "/tmp/runS --record --checkpoint /tmp/seedS && python experiments/planted_seeds.py /tmp/run0 ... "
             "--permutations {perm} --out seeds.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The planted analysis of several seeds, in one JSON file.")
    parser.add_argument("run_dirs", type=Path, nargs="+", help="planted runs, seed 0 first")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--permutations", type=int, default=10_000, help="per permutation test")
    args = parser.parse_args(argv)
    log = stderr_log()
    seeds = {}
    try:
        for s, run_dir in enumerate(args.run_dirs):
            log(f"seed {s}: {run_dir}")
            p = analyze_planted(load_run(run_dir), n_permutations=args.permutations)
            if p is None:
                raise VarjaxError(f"{run_dir} was not recorded on the planted set")
            seeds[str(s)] = seed_entry(p)
    except VarjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {"what": WHAT.format(seeds=f"0-{len(seeds) - 1}"), "reproduce": REPRODUCE.format(perm=args.permutations),
           "n_permutations": args.permutations, "seeds": seeds}
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
