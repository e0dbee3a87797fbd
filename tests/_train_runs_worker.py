"""torchrun worker for the tests: several train.py runs in one launch, one after the other.

  torchrun --standalone --nproc_per_node N tests/_train_runs_worker.py \\
      [PATCHES --] ARGS [--- [PATCHES --] ARGS]...

Each `---`-separated group of arguments is one train.main(ARGS) call (launch_args() builds the
list). PATCHES, comma-separated, hold for that run alone and are undone after it: the patches of
tests/_loss_worker.py (same_draws, deaf:R:H, ...) and

  lag:MS   rank 0 finishes every checkpoint and export MS milliseconds later (a sleep before it
           hashes train.json, i.e. before it renames the checkpoint folder into place, and before
           it exports), as on a loaded machine: a rank that ran ahead into the next run's --resume
           or --init would find nothing there.

Rank 0 prints `=== run K ===` before run K (from 0); split_runs() cuts the launch's output into
each run's (rank 0's lines are in order; the few lines other ranks print may land anywhere).

One launch instead of one per run: on a 2-core machine the launcher and the ranks' imports (~7 s a
launch) cost more than the tiny runs themselves. The runs share the launch's process group
(train.main would end it after each run; starting a second one in the same process is not
reliable under torchrun), which is ended once at the end.
"""
import inspect
import os
import sys
import time

import torch.distributed as dist

# the project files live at the repo root (no package): found when run by hand from anywhere
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _loss_worker  # noqa: E402
import train  # noqa: E402

MARK = "=== run {} ==="


def launch_args(*runs):
    """Runs -> the worker's arguments; a run is a train.py argument list or (PATCHES, that list)."""
    out = []
    for i, run in enumerate(runs):
        spec, argv = run if isinstance(run, tuple) else (None, run)
        out += (["---"] if i else []) + ([spec, "--"] if spec else []) + [str(a) for a in argv]
    return out


def split_runs(stdout, n):
    """A launch's stdout -> its n runs' outputs (run K's: from its `=== run K ===` line on)."""
    marks = [stdout.find(MARK.format(k)) for k in range(n)] + [len(stdout)]
    assert all(m >= 0 for m in marks), f"not every run started:\n{stdout[-3000:]}"
    return [stdout[marks[k]:marks[k + 1]] for k in range(n)]


def lag(ms, set_=setattr):
    if os.environ.get("RANK") != "0":
        return
    s, digest, export = ms / 1000, train.digest, train.export
    # digest: right before the rename (and in verify: harmless)
    set_(train, "digest", lambda state: (time.sleep(s), digest(state))[1])
    set_(train, "export", lambda *a: (time.sleep(s), export(*a))[1])


class Patches:
    """setattr that remembers what it replaced; undo() puts it back (as pytest's monkeypatch)."""

    def __init__(self):
        self.saved = []

    def __call__(self, obj, name, value):
        had = name in obj.__dict__ if inspect.isclass(obj) else hasattr(obj, name)
        self.saved.append((obj, name, getattr(obj, name) if had else None, had))
        setattr(obj, name, value)

    def undo(self):
        for obj, name, value, had in reversed(self.saved):
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)
        self.saved.clear()


def apply(spec, set_):
    for name in filter(None, spec.split(",")):
        if name.startswith("lag:"):
            lag(int(name[4:]), set_)
        else:
            _loss_worker.apply(name, set_)


if __name__ == "__main__":
    runs, cur = [], []
    for a in sys.argv[1:] + ["---"]:
        if a != "---":
            cur.append(a)
            continue
        runs.append((cur[0], cur[2:]) if cur[1:2] == ["--"] else ("", cur))
        cur = []
    end, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
    patches = Patches()
    for i, (spec, argv) in enumerate(runs):
        if os.environ.get("RANK") == "0":
            print(MARK.format(i), flush=True)
        apply(spec, patches)
        try:
            train.main(argv)
        finally:
            patches.undo()
    end()
    train.leave(0)  # see train.leave: no interpreter teardown after DDP
