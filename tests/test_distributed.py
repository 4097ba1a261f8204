"""Distributed meta-training (``bilevel/app/distributed/``): one run over many processes, with the
result of one process.

Multi-process runs use gloo on 127.0.0.1 only: processes started with a launcher's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``) or by
``torchrun`` (``python -m torch.distributed.run``), each running ``tests/dist_driver.py`` —
``bilevel-train`` with probes that record the tasks drawn, what the trainer got back from the
reduction, and every file written, and that inject faults. Single-process references run in this
process with the same probes. Tiny MLP/synthetic runs in float64: parameters after 10 steps agree
to 1e-12 relative (only the summation order of the reduction differs).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from hydra import compose, initialize_config_module

from bilevel import ModelConfig, build_algorithm, build_model
from bilevel.app.lifecycle.checkpoint import load_checkpoint
from bilevel.app.config.schema import register_configs
from bilevel.data import DataConfig, TaskSampler, build_dataset
from bilevel.app.distributed.launch import Launch, check_command_line, detect_launch, task_share
from bilevel.errors import ConfigError
from bilevel.testing import rel_err
from bilevel.app.train import train
from dist_driver import Probe

ROOT = Path(__file__).resolve().parents[1]
DRIVER = str(ROOT / "tests" / "dist_driver.py")
BASE = [
    "data=synthetic", "model=mlp", "model.hidden=8", "data.ways=3", "data.queries=2", "data.synthetic_dim=4",
    "data.synthetic_classes=8", "train.meta_batch=4", "train.steps=10", "train.log_every=5", "train.eval_every=10",
    "train.checkpoint_every=2", "train.decompose_every=3", "train.image_every=6", "eval.tasks=4",
    "eval.final_tasks=4", "device=cpu", "dtype=float64", "execution=loop",
]
ALGORITHMS = {
    "maml": ["algorithm=maml"],
    "imaml": ["algorithm=imaml", "algorithm.inner_steps=2", "algorithm.cg_iters=2", "algorithm.test_steps=1"],
    "entropy_sgd": ["algorithm=entropy_sgd", "algorithm.inner_steps=2", "algorithm.test_steps=1"],
}
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RESTART_COUNT")

pytestmark = pytest.mark.usefixtures("single_thread")


def config(*overrides: str):
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(record: Path, cache: Path, fault: Optional[str] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and k != "HYDRA_FULL_ERROR"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", BILEVEL_ALLOCATOR="default", BILEVEL_CACHE=str(cache),
               BILEVEL_TEST_RECORD=str(record))
    if fault:
        env["BILEVEL_TEST_FAULT"] = fault
    return env


@dataclass
class Outcome:
    """How one process ended: status, output and when (``time.time()``) it was seen to end."""

    returncode: Optional[int]
    stdout: str
    stderr: str
    ended: float


def wait_all(procs: list[subprocess.Popen], logs: list[Path], wait_for: list[int], timeout: float) -> list[Outcome]:
    """Wait for the processes ``wait_for`` (polling, to time their end), then kill the rest."""
    deadline, ended = time.monotonic() + timeout, {}
    while time.monotonic() < deadline and any(i not in ended for i in wait_for):
        for i in wait_for:
            if i not in ended and procs[i].poll() is not None:
                ended[i] = time.time()
        time.sleep(0.02)
    for i, proc in enumerate(procs):
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return [Outcome(p.returncode if i in ended else None, (log / "out").read_text(), (log / "err").read_text(),
                    ended.get(i, float("nan"))) for i, (p, log) in enumerate(zip(procs, logs))]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(args, cwd=log, env=env, stdout=(log / "out").open("w"), stderr=(log / "err").open("w"))


@dataclass
class Run:
    """A finished (or failed) run: its directory, each rank's probe record and each process's end."""

    directory: Path
    records: list[dict[str, Any]]
    outcomes: list[Outcome]

    def state(self) -> dict[str, Any]:
        return load_checkpoint(self.directory / "checkpoint.pt")

    def params(self) -> dict[str, torch.Tensor]:
        return self.state()["params"]


def records(record: Path, world: int) -> list[dict[str, Any]]:
    return [torch.load(record / f"rank{r}.pt", weights_only=False) if (record / f"rank{r}.pt").exists() else {}
            for r in range(world)]


def one_process(tmp: Path, overrides: list[str]) -> Run:
    """The run in this process, with the probes."""
    probe = Probe()
    with pytest.MonkeyPatch.context() as patch:
        probe.install(patch.setattr)
        patch.setenv("BILEVEL_CACHE", str(tmp / "cache"))
        train(config(*overrides), tmp / "run", show_progress=False)
    return Run(tmp / "run", [probe.record()], [])


def processes(tmp: Path, world: int, overrides: list[str], fault: Optional[str] = None,
              wait_for: Optional[list[int]] = None, timeout: float = 180) -> Run:
    """The run over ``world`` processes started with the launcher's environment (no agent)."""
    (tmp / "record").mkdir(parents=True, exist_ok=True)
    port, env = free_port(), base_env(tmp / "record", tmp / "cache", fault)
    logs = [tmp / f"rank{r}" for r in range(world)]
    procs = [start([sys.executable, DRIVER, *overrides, f"hydra.run.dir={tmp / 'run'}"],
                   dict(env, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)), logs[r]) for r in range(world)]
    outcomes = wait_all(procs, logs, list(range(world)) if wait_for is None else wait_for, timeout)
    return Run(tmp / "run", records(tmp / "record", world), outcomes)


def torchrun(tmp: Path, agents: list[list[str]], world: int, overrides: list[str], fault: Optional[str] = None,
             timeout: float = 240) -> Run:
    """The run started by one ``torchrun`` agent per entry of ``agents`` (its options)."""
    (tmp / "record").mkdir(parents=True, exist_ok=True)
    env = base_env(tmp / "record", tmp / "cache", fault)
    logs = [tmp / f"agent{a}" for a in range(len(agents))]
    procs = [start([sys.executable, "-m", "torch.distributed.run", *options, DRIVER, *overrides,
                    f"hydra.run.dir={tmp / 'run'}"], env, log) for options, log in zip(agents, logs)]
    outcomes = wait_all(procs, logs, list(range(len(agents))), timeout)
    return Run(tmp / "run", records(tmp / "record", world), outcomes)


def succeeded(run: Run) -> None:
    for i, outcome in enumerate(run.outcomes):
        assert outcome.returncode == 0, f"process {i} ended with {outcome.returncode}:\n{outcome.stderr[-3000:]}"


def same(a: Any, b: Any, equal: Callable[[torch.Tensor, torch.Tensor], bool] = torch.equal) -> bool:
    """Equal nested states, tensors compared by ``equal`` (bit for bit by default)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k], equal) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y, equal) for x, y in zip(a, b))
    return a == b


def close(a: Any, b: Any) -> bool:
    """Equal nested states, floating tensors to 1e-10 relative to their largest entry."""
    def equal(x: torch.Tensor, y: torch.Tensor) -> bool:
        if not x.is_floating_point():
            return torch.equal(x, y)
        return bool((x - y).abs().max() <= 1e-10 * y.abs().max()) if y.numel() else True

    return same(a, b, equal)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Callable[..., Run]:
    """``runs(algorithm, world, *extra)``: the run of ``BASE`` + the algorithm + ``extra`` on one
    process (in this process) or ``world`` processes, computed once per module."""
    done: dict[tuple, Run] = {}

    def get(algorithm: str, world: int, *extra: str) -> Run:
        key = (algorithm, world, extra)
        if key not in done:
            tmp = tmp_path_factory.mktemp(f"{algorithm}_{world}")
            overrides = BASE + ALGORITHMS[algorithm] + list(extra)
            done[key] = one_process(tmp, overrides) if world == 1 else processes(tmp, world, overrides)
            if world > 1:
                succeeded(done[key])
        return done[key]

    return get


# --- sharing out a meta-batch ----------------------------------------------------------------------------


def test_task_shares_are_contiguous_even_and_cover_the_meta_batch():
    for world in range(1, 5):
        for tasks in range(world, 11):
            shares = [task_share(tasks, r, world) for r in range(world)]
            assert [i for s in shares for i in s] == list(range(tasks))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [len(task_share(5, r, 2)) for r in range(2)] == [3, 2]


def test_shares_of_a_meta_batch_are_the_tasks_one_process_draws():
    dataset = build_dataset(DataConfig(name="synthetic", synthetic_classes=12, synthetic_dim=4), "train")
    whole = TaskSampler(dataset, ways=3, shots=1, queries=2, meta_batch=5, seed=4)
    for world in (2, 3, 5):
        sampler = TaskSampler(dataset, ways=3, shots=1, queries=2, meta_batch=5, seed=4)
        shares = [Launch(r, world).share(sampler) for r in range(world)]
        for step in range(3):
            batch = whole.draw(step, range(5))
            parts = [s.sample() for s in shares]
            assert [p.first_task for p in parts] == [s.start for s in (task_share(5, r, world) for r in range(world))]
            assert all(p.meta_tasks == 5 for p in parts)
            for field in ("support_x", "support_y", "query_x", "query_y", "classes"):
                assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(batch, field))
        assert all(s.state_dict() == {"step": 3} for s in shares)


def test_entropy_sgd_draws_the_whole_meta_batchs_noise_on_every_share():
    """Shares of a batch give the meta-gradient of the whole batch (weighted by share size) and
    leave the noise generator where the whole batch leaves it."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=8), (4,), 3).to(torch.float64)
    params = model.init_params()
    dataset = build_dataset(DataConfig(name="synthetic", synthetic_classes=12, synthetic_dim=4), "train")
    batch = TaskSampler(dataset, 3, 1, 2, meta_batch=5, seed=1).sample().to(dtype=torch.float64)
    sampler = TaskSampler(dataset, 3, 1, 2, meta_batch=5, seed=1)
    config = {"name": "entropy_sgd", "inner_steps": 2, "noise": 0.1, "seed": 3}
    whole = build_algorithm(config, model)
    g = whole.meta_grad(params, batch).grad
    parts = []
    for share in (range(0, 3), range(3, 5)):
        algo = build_algorithm(config, model)
        parts.append(algo.meta_grad(params, sampler.share(share).draw(0, share).to(dtype=torch.float64)).grad)
        assert torch.equal(algo.state_dict()["generator"], whole.state_dict()["generator"])
    combined = {k: (3 * parts[0][k] + 2 * parts[1][k]) / 5 for k in g}
    assert rel_err(combined, g) <= 1e-12


# --- the same run at any world size -----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["maml", "imaml", "entropy_sgd"])
def test_one_and_two_processes_draw_the_same_tasks_and_reach_the_same_parameters(runs, algorithm):
    one, two = runs(algorithm, 1), runs(algorithm, 2)
    whole, shares = one.records[0]["tasks"], [r["tasks"] for r in two.records]
    assert len(whole) == 10 and all(len(s) == 10 for s in shares)
    for (_, classes), *parts in zip(whole, *shares):
        assert [first for first, _ in parts] == [0, 2]
        assert torch.equal(torch.cat([c for _, c in parts]), classes)
    assert rel_err(two.params(), one.params()) <= 1e-12
    a, b = one.state(), two.state()
    assert a["sampler"] == b["sampler"] == {"step": 10}
    assert same(a["algorithm"], b["algorithm"]) and same(a["rng"], b["rng"])  # noise generator, γ-scoping counter
    assert close(b["optimizer"], a["optimizer"])


def test_four_processes_draw_the_same_tasks_and_reach_the_same_parameters(runs):
    one, four = runs("entropy_sgd", 1), runs("entropy_sgd", 4)  # one task per process
    for (_, classes), *parts in zip(one.records[0]["tasks"], *(r["tasks"] for r in four.records)):
        assert [first for first, _ in parts] == [0, 1, 2, 3]
        assert torch.equal(torch.cat([c for _, c in parts]), classes)
    assert rel_err(four.params(), one.params()) <= 1e-12
    assert same(four.state()["algorithm"], one.state()["algorithm"])


@pytest.mark.parametrize("algorithm", ["maml", "imaml", "entropy_sgd"])
def test_reduced_decomposition_passes_the_identity_check_and_equals_the_single_process_one(runs, algorithm):
    one, two = runs(algorithm, 1), runs(algorithm, 2)
    decomposed = 0
    for s1, s2, s2_rank1 in zip(one.records[0]["steps"], two.records[0]["steps"], two.records[1]["steps"]):
        d1, d2 = s1["decomposition"], s2["decomposition"]
        assert (d1 is None) == (d2 is None)
        assert same(s2["grad"], s2_rank1["grad"])  # every rank continues with the same reduced step
        if d1 is None:
            continue
        decomposed += 1
        assert same(d2, s2_rank1["decomposition"])
        assert d2["identity_error"] <= max(1e-12, 2 * d1["identity_error"])
        assert d2["terms"].keys() == d1["terms"].keys()
        for term in d1["terms"]:
            assert rel_err(d2["terms"][term], d1["terms"][term]) <= 1e-11, term
        assert rel_err(d2["total"], d1["total"]) <= 1e-12
        for field in ("pair_weights", "feature_cosines"):
            torch.testing.assert_close(d2[field], d1[field], rtol=1e-10, atol=1e-13)
        assert torch.equal(d2["same_class"], d1["same_class"]) and same(d2["labels"], d1["labels"])
        assert abs(d2["reconstruction_error"] - d1["reconstruction_error"]) <= 1e-13
        for key, value in d1["summary"].items():
            assert d2["summary"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert decomposed == 4  # steps 0, 3, 6, 9


def test_an_ablated_run_follows_the_reduced_kept_terms(runs):
    """Decomposition steps follow the kept terms of the reduced decomposition, the other steps the
    algorithm's ablated meta-gradient, reduced."""
    one, two = runs("maml", 1, "ablation=contrastive_only"), runs("maml", 2, "ablation=contrastive_only")
    assert rel_err(two.params(), one.params()) <= 1e-12
    for s1, s2 in zip(one.records[0]["steps"], two.records[0]["steps"]):
        assert rel_err(s2["grad"], s1["grad"]) <= 1e-11


def test_uneven_split_gives_the_single_process_meta_gradient(runs):
    five = ("train.meta_batch=5", "train.steps=2")
    one, two = runs("maml", 1, *five), runs("maml", 2, *five)
    for record, first, tasks in zip(two.records, (0, 3), (3, 2)):  # 3 + 2 tasks
        assert [(f, c.shape[0]) for f, c in record["tasks"]] == [(first, tasks)] * 2
    first_one, first_two = one.records[0]["steps"][0], two.records[0]["steps"][0]  # same parameters, same batch
    assert rel_err(first_two["grad"], first_one["grad"]) <= 1e-13
    assert first_two["loss"] == pytest.approx(first_one["loss"], rel=1e-13)
    assert rel_err(two.params(), one.params()) <= 1e-12


def test_resume_across_world_sizes_continues_the_trajectory(tmp_path, runs):
    straight = runs("maml", 1)
    overrides = BASE + ALGORITHMS["maml"]
    half = processes(tmp_path, 2, overrides + ["train.steps=5"])
    succeeded(half)
    assert half.state()["step"] == 5 and half.state()["sampler"] == {"step": 5}
    probe = Probe()
    with pytest.MonkeyPatch.context() as patch:
        probe.install(patch.setattr)
        train(config(*overrides, "train.resume=force"), half.directory, show_progress=False)  # train.steps 5 -> 10
    resumed = probe.record()["tasks"]
    assert len(resumed) == 5
    assert all(torch.equal(c, s) for (_, c), (_, s) in zip(resumed, straight.records[0]["tasks"][5:]))
    assert rel_err(half.params(), straight.params()) <= 1e-12


# --- faults -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["KILL", "RAISE", "STOP"])
def test_a_failed_rank_makes_the_others_exit_with_a_message_within_the_timeout(tmp_path, fault):
    timeout = 4
    run = processes(tmp_path, 2, BASE + ALGORITHMS["maml"] + [f"dist.timeout_s={timeout}"], fault=f"1:3:{fault}",
                    wait_for=[0], timeout=120)
    survivor = run.outcomes[0]
    assert survivor.returncode == 1, survivor.stderr
    assert "error: rank 0 of 2: the reduction of the meta-step failed (" in survivor.stderr
    assert "dist.timeout_s=4 s" in survivor.stderr and "Traceback" not in survivor.stderr
    waited = survivor.ended - float((tmp_path / "record" / "fault_time").read_text())
    assert waited < (timeout + 4 if fault == "STOP" else 4), waited
    if fault == "STOP":
        assert waited >= timeout - 0.5  # a hung peer is waited for up to the timeout, no longer
    assert run.state()["step"] == 2 and not (run.directory / "metrics.json").exists()


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_and_the_run_resumes(tmp_path, runs):
    overrides = BASE + ALGORITHMS["maml"] + ["train.checkpoint_every=5"]
    run = processes(tmp_path, 2, overrides, fault="0:3:TERM")  # rank 0 only, before it packs step 3
    checkpoint = run.directory / "checkpoint.pt"
    for outcome in run.outcomes:
        assert outcome.returncode == 143, outcome.stderr
        assert f"stopped by SIGTERM after step 4; checkpoint: {checkpoint} (step 4)" in outcome.stderr
    assert run.state()["step"] == 4
    resumed = processes(tmp_path, 2, overrides)
    succeeded(resumed)
    assert f"resuming {checkpoint} at step 4" in resumed.outcomes[0].stdout
    assert same(resumed.params(), runs("maml", 2).params())


def test_diverged_processes_stop_naming_the_first_differing_parameter(tmp_path):
    run = processes(tmp_path, 2, BASE + ALGORITHMS["maml"] + ["dist.check_every=2"], fault="1:2:DIVERGE")
    first = next(iter(run.state()["params"]))
    for outcome in run.outcomes:
        assert outcome.returncode == 1
        assert (f"the processes of this run diverged: parameter {first} differs between rank 0 and rank 1 after step 4"
                in outcome.stderr), outcome.stderr


def test_torchrun_restarts_a_failed_group_which_resumes_and_ends_at_the_uninterrupted_parameters(tmp_path, runs):
    agent = ["--nproc_per_node=2", "--max-restarts=1", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    run = torchrun(tmp_path, [agent], 2, BASE + ALGORITHMS["maml"], fault="1:5:KILL")
    succeeded(run)
    log = run.outcomes[0].stdout + run.outcomes[0].stderr
    # whether rank 0 prints its own message before the agent stops it is a race (the message is
    # tested in test_a_failed_rank_makes_the_others_exit_with_a_message_within_the_timeout); the
    # restart from the last checkpoint is what this test is about
    assert f"resuming {run.directory / 'checkpoint.pt'} at step 4" in log
    assert (tmp_path / "record" / "fault_time").exists()
    assert same(run.params(), runs("maml", 2).params())  # the uninterrupted two-process run, bit for bit
    assert rel_err(run.params(), runs("maml", 1).params()) <= 1e-12


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_two_nodes_on_loopback_match_one_process(tmp_path, runs, rendezvous):
    port = free_port()
    if rendezvous == "c10d":  # the documented cluster command; the rendezvous assigns the node ranks
        agents = [["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                   "--rdzv-id=two-nodes", "--local-addr=127.0.0.1"]] * 2
    else:
        agents = [["--nnodes=2", "--nproc_per_node=1", f"--node_rank={n}", "--master-addr=127.0.0.1",
                   f"--master-port={port}"] for n in (0, 1)]
    run = torchrun(tmp_path, agents, 2, BASE + ALGORITHMS["maml"])
    succeeded(run)
    assert all(r["tasks"] for r in run.records)
    assert rel_err(run.params(), runs("maml", 1).params()) <= 1e-12
    assert same(run.params(), runs("maml", 2).params())


# --- writing ------------------------------------------------------------------------------------------------


def test_only_rank_0_writes_to_the_run_directory(runs):
    one, two = runs("maml", 1), runs("maml", 2)
    test_dir = two.directory.parent
    inside = [w for w in two.records[1]["writes"] if w.removeprefix("mkdir ").startswith(str(test_dir))]
    # Hydra itself makes sure of the run directory on every process (mkdir, exist_ok) before the run starts; the
    # probe writes its record; outside the test's directory only libraries' caches appear (matplotlib's, torch's).
    assert set(inside) <= {f"mkdir {two.directory}", str(test_dir / "record" / "rank1.pt")}, inside
    assert sorted(p.name for p in (two.directory.parent / "rank1").iterdir()) == ["err", "out"]  # its working directory
    # the one-process run is in this process (no Hydra job logging, so no train.log); rank 0 of two writes it
    assert sorted(p.name for p in two.directory.iterdir()) == sorted([p.name for p in one.directory.iterdir()]
                                                                      + ["train.log"])
    assert any(w.startswith(str(two.directory)) for w in two.records[0]["writes"])  # the probe does see writes


def test_execution_auto_is_settled_by_rank_0_for_every_process(tmp_path):
    run = processes(tmp_path, 2, BASE + ALGORITHMS["maml"] + ["execution=auto", "train.steps=2"])
    succeeded(run)
    chosen = run.state()["execution"]
    assert f"(execution={chosen}): the faster way on this machine for this configuration, measured now" in \
        run.outcomes[0].stdout
    assert run.outcomes[1].stdout == ""  # the other process is silent, and measured nothing
    cache = tmp_path / "cache" / "execution.json"
    assert cache.exists() and not [w for w in run.records[1]["writes"] if w.startswith(str(tmp_path / "cache"))]


# --- set-up errors ------------------------------------------------------------------------------------------


def test_a_refused_start_ends_every_process_with_rank_0s_message(tmp_path):
    from bilevel.files import FileLock

    with FileLock(tmp_path / "run" / "run.lock"):
        run = processes(tmp_path, 2, BASE + ALGORITHMS["maml"])
    for outcome in run.outcomes:
        assert outcome.returncode == 1
        assert f"error: run directory {tmp_path / 'run'} is in use by another run (pid {os.getpid()}" in outcome.stderr
    resumed = processes(tmp_path, 2, BASE + ALGORITHMS["maml"] + ["train.resume=true"])
    for outcome in resumed.outcomes:
        assert outcome.returncode == 2 and "train.resume=true but" in outcome.stderr


TWO = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}


@pytest.mark.parametrize("env, overrides, message", [
    (TWO, ["train.meta_batch=1"], "train.meta_batch=1 is smaller than the 2 processes of this run"),
    (TWO, ["eval.tasks=1"], "eval.tasks=1 is smaller than the 2 processes of this run"),
    (TWO, ["dist.backend=nccl"], "dist.backend=nccl needs CUDA tensors, but this run is on cpu"),
    (TWO, ["dist.backend=mpi"], "dist.backend must be one of auto, gloo, nccl, got 'mpi'"),
    (TWO, ["dist.timeout_s=0"], "dist.timeout_s must be > 0, got 0"),
    ({"WORLD_SIZE": "2"}, [], "WORLD_SIZE is set but RANK, LOCAL_RANK is not"),
    ({**TWO, "RANK": "2"}, [], "inconsistent launcher environment: RANK=2, WORLD_SIZE=2"),
])
def test_bad_setups_fail_before_any_work(tmp_path, monkeypatch, env, overrides, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        train(config(*BASE, *overrides), tmp_path / "run", show_progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


def test_more_processes_on_a_node_than_gpus_fail_before_any_work(tmp_path, monkeypatch):
    for key, value in TWO.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"device=cuda: 2 processes on this node need one GPU each, but torch sees 1"):
        train(config(*BASE, "device=cuda"), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


def test_command_line_under_a_launcher_names_the_run_directory():
    assert detect_launch({}) == Launch()
    check_command_line(["train.steps=3"], {})  # no launcher: anything goes
    with pytest.raises(ConfigError, match="under torchrun, set hydra.run.dir=DIR"):
        check_command_line(["train.steps=3"], TWO)
    with pytest.raises(ConfigError, match=r"a sweep \(-m\) cannot run under torchrun"):
        check_command_line(["-m", "seed=0,1", "hydra.run.dir=x"], TWO)
    check_command_line(["hydra.run.dir=/tmp/x"], TWO)


# --- sweeps through Hydra's launchers -----------------------------------------------------------------------


def test_joblib_sweep_of_two_jobs_completes_and_bilevel_report_reads_it(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    env = base_env(tmp_path / "record", tmp_path / "cache")
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "bilevel.app.train", "-m", "hydra/launcher=joblib", "seed=0,1", *BASE,
         "train.steps=2", "train.decompose_every=1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib" in result.stdout + result.stderr
    jobs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(jobs) == 2
    report = subprocess.run([sys.executable, "-m", "bilevel.report", str(sweep), "--json", str(tmp_path / "r.json")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    (setting,) = json.loads((tmp_path / "r.json").read_text())
    assert setting["seeds"] == 2 and len(setting["runs"]) == 2
