"""Tests for tests/bench.py's command line (the benchmark itself is a script, not a test): what
the user asks for reaches the measurement. Nothing is timed here."""
import json
import sys
from types import SimpleNamespace

import pytest

import bench


def test_cp_reps_reaches_the_cp_workers(monkeypatch, tmp_path):
    """--cp-reps N: the torchrun children time N steps (they were passed --reps, which the cp
    worker does not read, and always timed the default 2)."""
    cmds, reps = [], []

    def fake_run(cmd, env=None, timeout=600):  # the children's command, not run
        cmds.append(cmd)
        return [dict(rank=r, s=1.0, peak_mb=1.0, samples=[1.0]) for r in range(int(cmd[5]))]

    monkeypatch.setattr(bench, "run_json", fake_run)
    monkeypatch.setattr(bench, "vae_folder", lambda tmp: str(tmp_path))
    args = SimpleNamespace(cp_frames=9, cp_reps=5, threads=2)
    bench.bench_cp(args, {}, str(tmp_path))
    assert [c[5] for c in cmds] == ["1", "2"]  # --nproc_per_node: one process, then 2 ranks
    monkeypatch.setattr(bench, "worker_cp", lambda T, folder, n: reps.append((T, folder, n)))
    for cmd in cmds:  # each child parses its command line as torchrun hands it over
        monkeypatch.setattr(sys, "argv", cmd[cmd.index(bench.__file__):])
        bench.main()
    assert reps == [(9, str(tmp_path), 5)] * 2


def test_only_names_no_unknown_section(monkeypatch, capsys):
    """--only with a typo ran no section and printed an empty table, exit 0: now one line naming
    the sections, exit code 2, before anything is measured."""
    monkeypatch.setattr(sys, "argv", ["bench.py", "--only", "dit,vea", "--threads", "1"])
    monkeypatch.setattr(bench, "matmul_rate", lambda: 1 / 0)  # nothing is measured
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("--only: no section vea; the sections are "
                        "dit,mfu,pack,attn,vae,cp,sim,loader")


def test_out_is_checked_before_measuring_and_its_folder_made(monkeypatch, tmp_path, capsys):
    """--out in a folder that did not exist yet: the JSON was lost after the whole run (a
    FileNotFoundError traceback); --out naming a folder: the same after the run. Now the folder
    is made, and a folder as --out is one line, exit code 2, before anything is measured."""
    monkeypatch.setattr(bench, "matmul_rate", lambda: 1e9)  # nothing is measured
    monkeypatch.setattr(bench, "SECTIONS", {"dit": lambda args, res, tmp: res.update(dit=1)})
    out = tmp_path / "new" / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--only", "dit", "--threads", "1", "--out",
                                      str(out)])
    bench.main()
    assert json.loads(out.read_text())["dit"] == 1
    monkeypatch.setattr(bench, "matmul_rate", lambda: 1 / 0)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--only", "dit", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"--out {tmp_path} is a folder; pass a file path")


def test_device_is_compared_by_type(monkeypatch, capsys):
    """--device cpu:0 is the CPU (was refused: a string compare with "cpu"); another device, or
    none, is one line, exit code 2, before anything is measured."""
    monkeypatch.setattr(bench, "wait_for_load", lambda *a: None)
    monkeypatch.setattr(bench, "matmul_rate", lambda: 1e9)  # nothing is measured
    ran = []
    monkeypatch.setattr(bench, "SECTIONS", {"dit": lambda args, res, tmp: ran.append(args.device)})
    monkeypatch.setattr(sys, "argv", ["bench.py", "--only", "dit", "--device", "cpu:0"])
    bench.main()
    assert ran == ["cpu:0"]
    monkeypatch.setattr(bench, "matmul_rate", lambda: 1 / 0)
    for dev in ("cuda", "cuda:0", "gpu"):
        monkeypatch.setattr(sys, "argv", ["bench.py", "--only", "dit", "--device", dev])
        with pytest.raises(SystemExit) as e:
            bench.main()
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            f"--device {dev}: bench.py measures the CPU targets of issue 9; use --device cpu")
