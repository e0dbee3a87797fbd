"""Sequence-parallel workers for the tests (tests/test_dit.py, tests/test_sample.py), run under torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/_sp_worker.py dit
        The tiny DiT (random weights, modulation included) with --sp = every rank, against the same model in
        this process without SP, unpacked and Frame Pack batches whose rows are not a multiple of the group:
        outputs, input gradients and parameter gradients (each rank's, averaged over the group: see dit.py's
        sequence parallel section). Rank 0 prints one line `SPDIFF {json}` of the largest differences.
    python -m torch.distributed.run --nproc_per_node 2 tests/_sp_worker.py sample -- <sample.py arguments>
        [--- <sample.py arguments>]...
        sample.py with data.write_video patched to also save the float video as <path>.rank<R>.pt (the
        same patch, applied in pytest, gives the one-process reference; write() below), once for
        each `---`-separated argument list, in one launch (see tests/_train_runs_worker.py: the
        first run starts the process group, which the later ones share). Rank 0 prints
        `=== run K ===` before run K and `ALL_TO_ALL n` after it: how many all-to-alls the DiT ran.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

# the project files live at the repo root (no package): found when run by hand from anywhere
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import dit  # noqa: E402


def randomize(model, seed=0, std=0.05):
    """Every weight random (our init zeroes the modulation and the output: v would be 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = "norm" in name and name.endswith("weight")  # LayerNorm gains around 1
            p.copy_(torch.randn(p.shape, generator=g) * std + gain)
    return model


def run(model, fn, inputs, weight):
    """fn(model, *inputs) -> outputs (a list), loss = Σ weight·output, backward -> (outputs, input grads,
    parameter grads) detached."""
    model.zero_grad(set_to_none=True)
    xs = [z.detach().clone().requires_grad_() for z in inputs]
    outs = fn(model, *xs)
    sum(((o * w).sum() for o, w in zip(outs, weight)), torch.zeros(())).backward()
    return ([o.detach() for o in outs], [z.grad for z in xs],
            {k: p.grad.clone() for k, p in model.named_parameters()})


def group_mean(grads, G):
    """Each rank's gradients averaged over the group (what DDP / FSDP do over ranks)."""
    for g in grads:
        dist.all_reduce(g)
        g /= G
    return grads


def diff(ref, got):
    return max(float((a - b).abs().max()) for a, b in zip(ref, got))


def check_dit():
    dist.init_process_group("gloo")
    G = dist.get_world_size()
    sp = dit.sp_group(dist.group.WORLD)
    report = {}
    gen = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731  (the same on every rank)
    # "1.5": RoPE with a temporal patch of 2 (odd latent frame counts padded) and the ofs embedding
    v15 = {"pos": "rope", "patch_t": 2, "ofs_dim": dit.DIT_PRESETS["tiny"].time_dim}
    for pos in ("rope", "sincos", "1.5"):
        over = v15 if pos == "1.5" else {"pos": pos}
        cfg = dit.DiTConfig(**{**dit.asdict(dit.DIT_PRESETS["tiny"]), **over, "layers": 2})
        torch.manual_seed(0)
        model = randomize(dit.ExpertDiT(cfg))
        L, C = cfg.text_len, cfg.in_channels
        # unpacked: 2 samples of 12 text + 3·3·3 video tokens = 39 (odd; 1.5: 5 frames -> 3 as well)
        x = rand(2, C, 5 if pos == "1.5" else 3, 6, 6)
        t, text = torch.tensor([17, 901]), rand(2, L, cfg.text_dim)
        # Frame Pack: rows of 39 + 14 = 53 and 18 + 14 = 32 tokens (with the padding, 54 per row)
        lat = [rand(C, 3, 6, 6), rand(C, 1, 4, 6), rand(C, 2, 2, 2), rand(C, 1, 2, 4)]
        rows, tp, textp = [0, 1, 1, 0], torch.tensor([5, 300, 640, 999]), rand(4, L, cfg.text_dim)
        cases = {"unpacked": (lambda m, x, text: [m(x, t, text)], [x, text]),
                 "packed": (lambda m, text, *z: m.forward_packed(list(z), tp, text, rows), [textp, *lat])}
        for name, (fn, inputs) in cases.items():
            for mode in (("dense", "segments") if name == "packed" else ("auto",)):
                # checkpointing: plain, and (once) with the block inputs offloaded to host memory
                cks = (False, True, "offload") if (pos, mode) == ("rope", "segments") else (False, True)
                if pos == "1.5" and mode == "dense":
                    continue
                for ck in cks:
                    model.packed_attention, model.sp = mode, None
                    model.checkpointing, model.offload = bool(ck), ck == "offload"
                    outs = fn(model, *inputs)
                    # a random linear loss of O(1) gradients (so the tolerance means ~1e-5 relative)
                    weight = [rand(*o.shape) / o.numel() ** 0.5 for o in outs]
                    ref = run(model, fn, inputs, weight)
                    model.sp = sp
                    got = run(model, fn, inputs, weight)
                    key = f"{pos}/{name}/{mode}" + {False: "", True: "/checkpointing"}.get(ck, f"/{ck}")
                    report[key] = {"out": diff(ref[0], got[0]),
                                   "input_grad": diff(ref[1], group_mean(got[1], G)),
                                   "param_grad": diff(list(ref[2].values()),
                                                      group_mean(list(got[2].values()), G)),
                                   "scale": [max(float(g.abs().max()) for g in ref[1]),
                                             max(float(g.abs().max()) for g in ref[2].values())]}
    if dist.get_rank() == 0:
        print("SPDIFF " + json.dumps(report), flush=True)
    dist.destroy_process_group()


def write(set_=setattr):
    """data.write_video also saves the float video it writes (to compare ranks and processes)."""
    real = data.write_video

    def write_video(video, path, *a, **k):
        torch.save(video.clone(), f"{path}.rank{os.environ.get('RANK', 0)}.pt")
        return real(video, path, *a, **k)
    set_(data, "write_video", write_video)


if __name__ == "__main__":
    if sys.argv[1] == "dit":
        check_dit()
    elif sys.argv[1] == "sample":
        import sample
        write()
        calls, real = [], dist.all_to_all_single  # count the DiT's all-to-alls: SP really ran

        def counted(*a, **k):
            calls.append(1)
            return real(*a, **k)
        dist.all_to_all_single = counted
        end, init = dist.destroy_process_group, dist.init_process_group  # one group for all runs
        dist.destroy_process_group = lambda *a, **k: None
        dist.init_process_group = lambda *a, **k: None if dist.is_initialized() else init(*a, **k)
        runs = [[]]
        for a in sys.argv[sys.argv.index("--") + 1:]:
            if a == "---":
                runs.append([])
            else:
                runs[-1].append(a)
        for k, argv in enumerate(runs):
            calls.clear()
            if os.environ.get("RANK") == "0":
                print(f"=== run {k} ===", flush=True)
            sample.main(argv)
            if os.environ.get("RANK") == "0":
                print(f"ALL_TO_ALL {len(calls)}", flush=True)
        end()
    # Leave as train.leave does, past the interpreter's teardown: collectives ran inside
    # backward(), and gloo's threads freeing their records then can abort a finished worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
