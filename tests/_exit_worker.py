"""torchrun worker for tests/test_train.py::test_a_torchrun_worker_leaves_without_teardown.

  torchrun --standalone --nproc_per_node 2 tests/_exit_worker.py leave|plain

The pattern behind train.leave(): a DDP step (its all-reduces run inside backward), a barrier, the process
group destroyed, then the end of the process through train.leave(0), which must skip the interpreter's teardown
(an atexit handler tells whether it ran). `plain` (the control: no DDP) ends as Python does."""
import atexit
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# the project files live at the repo root (no package): found when run by hand from anywhere
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    atexit.register(lambda: print(f"rank {rank}: interpreter teardown", flush=True))
    # plain: the control that the atexit handler shows a teardown. Without DDP, whose gloo threads
    # outlive destroy_process_group and can abort that teardown (the race leave() avoids: here
    # about 1 launch in 9 aborted the control itself)
    lin = torch.nn.Linear(4, 4)
    net = DDP(lin) if sys.argv[1] == "leave" else lin
    net(torch.ones(2, 4)).sum().backward()
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: done", end="\n")  # not flushed here: leave() must flush it
    if sys.argv[1] == "leave":
        train.leave(0)
