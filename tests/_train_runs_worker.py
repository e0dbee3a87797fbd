"""torchrun worker for tests/test_train.py: several train.py runs in one launch, one after the other.

  torchrun --standalone --nproc_per_node 2 tests/_train_runs_worker.py ARGS... [--- ARGS...]...

Each `---`-separated group of arguments is one train.main() call. One launch instead of one per run: on a
2-core machine the launcher and the imports of two ranks cost more than the tiny runs themselves. The runs
share the launch's process group (train.main would end it after each run; starting a second one in the same
process is not reliable under torchrun), which is ended once at the end.

TEST_SAVE_LAG=<seconds>: rank 0 finishes every checkpoint and export that much later (a sleep before it renames
the checkpoint folder into place, and before it exports), as on a loaded machine: a rank that ran ahead into
the next run's --resume or --init would find nothing there.
"""
import os
import sys
import time

import torch.distributed as dist

import train

if __name__ == "__main__":
    runs, cur = [], []
    for a in sys.argv[1:] + ["---"]:
        if a == "---":
            runs.append(cur)
            cur = []
        else:
            cur.append(a)
    lag = float(os.environ.get("TEST_SAVE_LAG", 0))
    if lag and os.environ.get("RANK") == "0":
        digest = train.digest  # rank 0 only, right before the rename (and in verify: harmless)
        train.digest = lambda state: (time.sleep(lag), digest(state))[1]
        export = train.export
        train.export = lambda *a: (time.sleep(lag), export(*a))[1]
    end, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
    for argv in runs:
        train.main(argv)
    end()
    train.leave(0)  # see train.leave: no interpreter teardown after DDP
