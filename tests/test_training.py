"""Tasks against their definitions, the trainer on a learnable task, and the sweep store."""

import sqlite3

import pytest
import torch

from headalloc.tasks import make_task
from headalloc.training import NonFiniteLossError, SweepStore, TrainConfig, run_sweep, train
from headalloc.training.runs import build_model, run_synthetic


def test_convolution_target_by_definition():
    t = make_task("convolution", d=3, lags=[0, 2], T=6, n_train=4, n_val=2, seed=0)
    x, y = t.x_train, t.y_train
    # recover rho_0 and rho_2 by least squares on positions where both lags exist, check exact fit
    X = torch.cat([x[:, 2:], x[:, :-2]], -1).reshape(-1, 6)
    sol = torch.linalg.lstsq(X, y[:, 2:].reshape(-1, 3)).solution
    assert torch.allclose(X @ sol, y[:, 2:].reshape(-1, 3), atol=1e-4)
    assert t.score_mask.tolist() == [False, False, True, True, True, True]


def test_induction_first_step_and_induction():
    t = make_task("induction_first_step", d=4, T=8, n_train=3, n_val=1)
    assert torch.allclose(t.y_train[:, 1:], t.x_train[:, :-1])
    ind = make_task("induction", vocab=10, T=8, n_train=5, n_val=2)
    assert torch.equal(ind.x_train[:, :4], ind.x_train[:, 4:])
    m = ind.score_mask
    assert torch.equal(ind.y_train[:, m], ind.x_train[:, 5:8])


def test_dretrieval_target_by_definition():
    t = make_task("dretrieval", D=3, d=4, T=5, n_train=50, n_val=10, seed=0)
    a = torch.tensor(t.info["a"])
    raw = (t.x_train @ a.T).amax(1).sum(-1, keepdim=True)
    mu, sd = t.info["y_mean"][0], t.info["y_std"][0]
    assert torch.allclose((raw - mu) / sd, t.y_train, atol=1e-5)
    assert torch.linalg.matrix_rank(a) == 3
    g = make_task("dretrieval_general", D=3, d=2, T=8, n_train=20, n_val=5, subsets=True, F0="tanh")
    assert g.y_train.shape == (20, 1) and torch.isfinite(g.y_train).all()
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope")
    with pytest.raises(ValueError, match="need d >= D"):
        make_task("dretrieval", D=5, d=4)


def test_trainer_learns_previous_token_copy():
    task = make_task("induction_first_step", d=4, T=8, n_train=2000, n_val=500)
    model = build_model(task, {"d_model": 32, "layers": [[[2, 16, 16]]], "positions": "rotary"})
    before = train(model, task, TrainConfig(steps=1, eval_every=1), progress=False)["val"]["nmse"]
    out = train(model, task, TrainConfig(steps=300, lr=3e-3, eval_every=100, seed=0), progress=False)
    assert out["val"]["nmse"] < 0.1 * before
    assert [h["step"] for h in out["history"]] == [100, 200, 300]


def test_trainer_is_deterministic_and_detects_nonfinite_loss():
    task = make_task("convolution", d=4, lags=[0, 1], T=6, n_train=256, n_val=64)
    cfg = {"task": {"name": "convolution", "d": 4, "lags": [0, 1], "T": 6, "n_train": 256, "n_val": 64},
           "model": {"d_model": 16, "layers": [[[2, 8, 8]]], "positions": "sinusoidal"},
           "train": {"steps": 20, "eval_every": 10}}
    assert run_synthetic(cfg)["val"] == run_synthetic(cfg)["val"]
    model = build_model(task, cfg["model"])
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        train(model, task, TrainConfig(steps=50, lr=1e12, warmup=1, grad_clip=0), progress=False)


def test_a_run_leaves_the_callers_thread_count_as_it_was():
    # a run in the caller's process (local sweeps inside `reproduce`) must not leave later experiments on its
    # thread count: that changed their speed and, through summation order, their numbers (session 14)
    import torch
    cfg = {"task": {"name": "convolution", "d": 2, "lags": [0], "T": 4, "n_train": 32, "n_val": 8},
           "model": {"d_model": 8, "layers": [[[1, 4, 4]]]}, "train": {"steps": 2, "eval_every": 2}, "threads": 1}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_synthetic(cfg)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="unknown setting"):  # restored on an error too
            run_synthetic({**cfg, "train": {"stepz": 2}})
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _tiny_configs(n):
    return [{"label": f"r{i}", "task": {"name": "convolution", "d": 2, "lags": [0], "T": 4, "n_train": 64,
                                        "n_val": 16}, "model": {"d_model": 8, "layers": [[[1, 4, 4]]]},
             "train": {"steps": 3, "eval_every": 3, "seed": i}} for i in range(n)]


def test_sweep_store_skips_finished_runs_and_survives_interruption(tmp_path, monkeypatch):
    store = tmp_path / "runs.sqlite"
    configs = _tiny_configs(3)
    calls = []
    import headalloc.training.runs as runs

    killed = []

    def flaky(cfg):
        calls.append(cfg["label"])
        if cfg["label"] == "r2" and not killed:
            killed.append(1)
            raise KeyboardInterrupt  # killed midway, the first time only
        return runs.run_synthetic(cfg)

    monkeypatch.setattr(runs, "flaky", flaky, raising=False)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(configs, store, "headalloc.training.runs:flaky", progress=False)
    assert calls == ["r0", "r1", "r2"] and len(SweepStore(store)) == 2  # the finished runs are kept
    calls.clear()
    results = run_sweep(configs, store, "headalloc.training.runs:flaky", progress=False)
    assert calls == ["r2"] and all(r is not None for r in results)  # only the unfinished run is recomputed
    calls.clear()
    run_sweep(configs, store, "headalloc.training.runs:flaky", progress=False)
    assert calls == [] and len(SweepStore(store)) == 3
    with sqlite3.connect(store) as c:
        assert c.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 3


def test_sweep_rejects_duplicates_and_corrupt_store(tmp_path):
    with pytest.raises(ValueError, match="same config twice"):
        run_sweep(_tiny_configs(1) * 2, tmp_path / "s.sqlite", progress=False)
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="not a usable sweep store"):
        SweepStore(bad)


def test_sweep_local_pool_matches_inline(tmp_path):
    cfgs = _tiny_configs(2)
    a = run_sweep(cfgs, tmp_path / "a.sqlite", progress=False)
    b = run_sweep(cfgs, tmp_path / "b.sqlite", progress=False, workers=2)
    assert [r["val"] for r in a] == [r["val"] for r in b]


@pytest.mark.ray
def test_sweep_on_local_ray_instance(tmp_path):
    pytest.importorskip("ray")
    cfgs = _tiny_configs(2)
    a = run_sweep(cfgs, tmp_path / "a.sqlite", progress=False)
    b = run_sweep(cfgs, tmp_path / "ray.sqlite", executor="ray", progress=False)
    assert [r["val"] for r in a] == [r["val"] for r in b]


def test_sweep_command_runs_a_tiny_sweep(tmp_path, capsys):
    """The `headalloc sweep` command end to end (its --fn flag once collided with the subcommand's)."""
    import json

    from headalloc.cli import main

    cfg = tmp_path / "runs.json"
    cfg.write_text(json.dumps(_tiny_configs(2)))
    store = tmp_path / "s.sqlite"
    assert main(["sweep", "--config", str(cfg), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "2 runs in" in out and len(SweepStore(store)) == 2


def test_config_typos_and_empty_reports_are_clear_errors(tmp_path, capsys):
    import json

    from headalloc.cli import main

    cfg = _tiny_configs(1)[0]
    cfg["train"]["stpes"] = cfg["train"].pop("steps")
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(p)]) == 2
    assert "did you mean train.steps?" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path / "nothing")]) == 2
    assert "holds no experiment results" in capsys.readouterr().err
    assert not (tmp_path / "nothing" / "report.html").exists()


def test_pool_workers_end_when_their_parent_is_killed(tmp_path):
    """A sweep killed with SIGKILL leaves no worker process behind (PR_SET_PDEATHSIG)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = "\n".join([
        "from headalloc.training.sweep import end_with_parent",
        "import multiprocessing as mp, os, time",
        "def work(_):",
        "    time.sleep(60)",
        "if __name__ == '__main__':",
        "    with mp.get_context('spawn').Pool(1, initializer=end_with_parent, initargs=(os.getpid(),)) as p:",
        "        r = p.map_async(work, [0])",
        "        time.sleep(0.5)",
        "        print([c.pid for c in mp.active_children()], flush=True)",
        "        time.sleep(60)", ""])
    (tmp_path / "s.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "s.py")], stdout=subprocess.PIPE, text=True)
    kids = eval(proc.stdout.readline())
    assert kids
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60  # the worker may still be importing torch when its parent dies
    while time.time() < deadline and any(os.path.exists(f"/proc/{k}") and
                                         open(f"/proc/{k}/stat").read().split()[2] != "Z" for k in kids):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{k}") and open(f"/proc/{k}/stat").read().split()[2] != "Z" for k in kids)
