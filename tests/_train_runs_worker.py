"""torchrun worker for tests/test_train.py: several train.py runs in one launch, one after the other.

  torchrun --standalone --nproc_per_node 2 tests/_train_runs_worker.py ARGS... [--- ARGS...]...

Each `---`-separated group of arguments is one train.main() call. One launch instead of one per run: on a
2-core machine the launcher and the imports of two ranks cost more than the tiny runs themselves. The runs
share the launch's process group (train.main would end it after each run; starting a second one in the same
process is not reliable under torchrun), which is ended once at the end.
"""
import sys

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
    end, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
    for argv in runs:
        train.main(argv)
    end()
