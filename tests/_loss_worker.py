"""Patches for the loss-weighting tests (tests/test_loss.py), applied in pytest (monkeypatch) or,
for one run of a launch, in a torchrun rank (tests/_train_runs_worker.py):

    python -m torch.distributed.run ... tests/_train_runs_worker.py same_draws,deaf:1:1 -- \
        <train.py arguments> [--- ...]

same_draws      per-sample randomness that depends on the tensor shape only (t = 500, no text dropout,
                noise keyed by shape): a sample's loss is then a function of its content alone, whatever
                its slot, micro-batch or rank. (train.py keys the real draws by (step, micro, slot), so
                2 micro-batches and one merged batch draw differently by design.)
merged          every micro-batch is two consecutive sampler batches merged into one (rows renumbered,
                slots, n_global and the sampler's weights of the merged batch): one big batch of
                exactly the samples that --accum 2 spreads over two micro-batches.
deaf:R:H        the files of global rows >= H are unreadable, with R rows per rank (the row of a
                Frame Pack key; a Bucket key's row is its place in the global batch); deaf:1:1 under
                torchrun with one row per rank: rank 1 reads nothing at all. An --sp / --cp group's
                ranks hold the same rows: deaf:2:3 with 2 rows, rank 1 alone fails on row 1.
"""
import itertools
import os
import sys

import torch

# the project files live at the repo root (no package): found when run by hand from anywhere
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402


def same_draws(set_=setattr):
    def draws(tc, n, *a):
        none = torch.zeros(n, dtype=torch.bool)  # no text dropout, no image dropout
        return torch.full((n,), 500, dtype=torch.long), none, torch.ones(n), none
    set_(train, "draws", draws)
    set_(train, "noise", lambda shape, *key: torch.randn(shape, generator=train.gen(*shape)))


def merge(a, b, rows, patch=2):
    """Two micro-batches of one rank -> one batch: b's rows after a's, b's slots after a's."""
    na = a["items"][0]["n_global"] if a["items"] else 0
    nb = b["items"][0]["n_global"] if b["items"] else 0
    out = [dict(it, row=it["row"] + rows * k, n_global=na + nb,
                slot=it["slot"] + na * k if it["slot"] >= 0 else -1)
           for k, mb in enumerate((a, b)) for it in mb["items"]]
    tok = [it["mean"][0].numel() / patch ** 2 if it["weight"] > 0 else 0.0 for it in out]
    for it, n in zip(out, tok):  # the sampler's weights: shares of the merged batch's tokens
        it["weight"] = n / sum(tok)
    return {"items": out, "bad": a["bad"] + b["bad"]}


def merged(set_=setattr):
    real = train.enter_stage

    def enter_stage(job, i, pos):
        stream, max_tokens = real(job, i, pos)
        pairs = (merge(next(stream), next(stream), job.tc.rows, job.cfg.patch)
                 for _ in itertools.count())
        return pairs, max_tokens
    set_(train, "enter_stage", enter_stage)


def deaf(per_rank, first, set_=setattr):
    rank = int(os.environ.get("RANK", 0))
    for cls in (data.Prepared, data.VideoDataset):
        def get(self, key, real=cls.__getitem__):
            if isinstance(key, tuple) and rank * per_rank + key[1] >= first:
                return None  # as for an unreadable file: collate counts it
            return real(self, key)
        set_(cls, "__getitem__", get)


def apply(spec, set_=setattr):
    for name in filter(None, spec.split(",")):
        fn, *nums = name.split(":")
        globals()[fn](*map(int, nums), set_=set_)

