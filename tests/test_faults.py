"""Fault injection: a run never lies and never loses its record.

Each test replays one fault a reliability tester found (diverging runs, wrong and corrupt
resumes, kills and signals, shared run directories, corrupt caches, malformed overrides) on
tiny MLP/synthetic runs. Faults land at known steps through the algorithm's
``outer_step_done``: in-process as an exception (a crash), in a subprocess
(``tests/fault_driver.py``) as a real ``kill -9``, SIGINT or SIGTERM. Bit-exactness is
``torch.equal`` on every parameter against an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shlex
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

import bilevel.algorithm as engine
import bilevel.data.glyphs as glyphs
from bilevel.algorithm import get_algorithm, register
from bilevel.app.lifecycle.checkpoint import load_checkpoint
from bilevel.app.config.schema import register_configs, typed_config
from bilevel.errors import ConfigError, CorruptFileError, NonFiniteError, ResumeError, RunDirectoryBusy, StorageError
from bilevel.files import FileLock, save_checked
from bilevel.execution.memory import memory_plans
from bilevel.primitives.models import build_model
from bilevel.run_files import event_files
from bilevel.tags import logical
from bilevel.app.train import train
from algorithms.maml import MAML
from bilevel import Want

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data=synthetic", "model=mlp", "model.hidden=8", "data.ways=3", "data.queries=2", "data.synthetic_dim=4",
    "data.synthetic_classes=8", "train.meta_batch=2", "train.steps=8", "train.log_every=1", "train.eval_every=4",
    "train.checkpoint_every=2", "train.decompose_every=2", "train.image_every=0", "eval.tasks=2",
    "eval.final_tasks=2", "device=cpu",
]
ALGORITHMS = {
    "maml": ["algorithm=maml"],
    "imaml": ["algorithm=imaml", "algorithm.inner_steps=2", "algorithm.cg_iters=2", "algorithm.test_steps=1"],
    "entropy_sgd": ["algorithm=entropy_sgd", "algorithm.inner_steps=2", "algorithm.test_steps=1"],
    "reptile": ["algorithm=maml"],  # replaced by REPTILE after composition (no config group for a plugin)
}
REPTILE = {"name": "reptile", "inner_steps": 2, "inner_lr": 0.1}

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache directory per test (execution measurements, glyphs)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("BILEVEL_CACHE", str(path))
    return path


@pytest.fixture
def reptile(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "reptile_plugin"))
    monkeypatch.setattr(engine, "_REGISTRY", dict(engine._REGISTRY))
    from reptile_plugin import Reptile

    register("reptile")(Reptile)


def config(*overrides: str, algorithm: str = "maml"):
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        cfg = compose("train", overrides=TINY + ALGORITHMS[algorithm] + list(overrides))
    if algorithm == "reptile":
        cfg.algorithm = REPTILE
    return cfg


def params_of(run_dir: Path, name: str = "checkpoint.pt") -> dict:
    return load_checkpoint(run_dir / name, torch.device("cpu"))["params"]


def assert_bit_equal(a: dict, b: dict, why: str = "") -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"parameters differ bit for bit ({why}): {differ}"


class Crash(Exception):
    """An in-process stand-in for a crash at a known step."""


@contextmanager
def crash_after(algorithm: str, step: int) -> Iterator[None]:
    """Within the block, the ``step``-th outer step raises :class:`Crash` before its checkpoint."""
    cls = get_algorithm(algorithm)
    original, count = cls.__dict__.get("outer_step_done"), [0]
    step_done = cls.outer_step_done

    def outer_step_done(self) -> None:
        step_done(self)
        count[0] += 1
        if count[0] == step:
            raise Crash(step)

    cls.outer_step_done = outer_step_done
    try:
        yield
    finally:
        if original is None:
            del cls.outer_step_done
        else:
            cls.outer_step_done = original


def run_cli(args: list[str], cwd: Path, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", BILEVEL_ALLOCATOR="default",
               BILEVEL_CACHE=str(cache))
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def cli_overrides(algorithm: str, *extra: str) -> list[str]:
    return TINY + ALGORITHMS[algorithm] + list(extra)


def events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) points, in file order, over all event files (tags of nested
    runs as the code names them: :func:`bilevel.tags.logical`)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(run_dir):
        nested = path.parent.name if len(path.relative_to(run_dir / "tb").parts) == 3 else ""
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(logical(nested, value.tag), []).append((event.step, value.simple_value))
    return out


# --- 1. non-finite values stop the run ------------------------------------------------------------------


def test_diverged_run_with_a_zeroed_head_stops_naming_the_tensor_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError) as err:
        train(config("train.lr=1e6", "train.checkpoint_every=1", "execution=loop"), tmp_path / "run", show_progress=False)
    message = str(err.value)
    assert "parameter head.weight at step 2" in message
    assert f"last good checkpoint: {tmp_path / 'run' / 'checkpoint.pt'} (step 1)" in message
    assert not (tmp_path / "run" / "metrics.json").exists()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 1 and all(torch.isfinite(p).all() for p in state["params"].values())


class _SpoiledFromStep3(MAML):
    """MAML whose meta-step is spoiled by :meth:`spoil` from the 3rd meta-step on."""

    calls = 0

    def meta_step(self, params, batch, want=Want()):
        step = super().meta_step(params, batch, want)
        type(self).calls += 1
        if type(self).calls >= 3:
            self.spoil(step)
        return step


class _NaNGradient(_SpoiledFromStep3):
    """The gradient of the first encoder weight is NaN from the 3rd meta-step on."""

    def spoil(self, step):
        step.grad["encoder.layers.0.weight"] = step.grad["encoder.layers.0.weight"] * float("nan")


def test_non_finite_gradient_is_named_before_the_parameters_it_poisons(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "_REGISTRY", dict(engine._REGISTRY))
    register("nan_grad_maml")(_NaNGradient)
    _NaNGradient.calls = 0
    with pytest.raises(NonFiniteError, match=r"the gradient of encoder\.layers\.0\.weight at step 3 \(and \d+ more"):
        train(config("algorithm.name=nan_grad_maml", "train.log_every=4", "execution=loop"), tmp_path, show_progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2  # the check before the step-4 checkpoint caught it


# --- 2. resume is a contract -----------------------------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    train(config("execution=loop"), run_dir, show_progress=False)
    return run_dir


@pytest.mark.parametrize("override, key", [
    ("algorithm=fomaml", "algorithm.order"), ("data.seed=1", "data.seed"), ("train.meta_batch=3", "train.meta_batch"),
    ("model.hidden=16", "model.hidden"), ("dtype=float64", "dtype"), ("execution=vmap", "execution"),
    ("cpu_conv=native", "cpu_conv"),
])
def test_resume_with_another_trajectory_is_refused_and_the_record_is_kept(finished_run, override, key):
    before = {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()}
    with pytest.raises(ResumeError, match=rf"must match: .*{key} \(checkpoint: .*, now: .*\)") as err:
        train(config("execution=loop", override), finished_run, show_progress=False)
    print(err.value)
    assert {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()} == before


def test_steps_below_the_checkpoint_are_refused_and_upwards_need_force(finished_run):
    with pytest.raises(ResumeError, match="at step 8, past train.steps=4"):
        train(config("execution=loop", "train.steps=4", "train.resume=force"), finished_run, show_progress=False)
    with pytest.raises(ResumeError, match=r"may change with train.resume=force: train.steps \(checkpoint: 8, now: 10\)"):
        train(config("execution=loop", "train.steps=10"), finished_run, show_progress=False)
    metrics = train(config("execution=loop", "train.steps=10", "train.resume=force"), finished_run, show_progress=False)
    assert metrics["steps"] == 10 and load_checkpoint(finished_run / "checkpoint.pt")["step"] == 10
    assert "steps: 8" in (finished_run / "config.1.yaml").read_text()  # the earlier config is kept
    assert "steps: 10" in (finished_run / "config.yaml").read_text()


def test_resume_true_needs_a_checkpoint_and_false_refuses_one(tmp_path, finished_run):
    with pytest.raises(ResumeError, match="train.resume=true but .* holds no checkpoint"):
        train(config("train.resume=true"), tmp_path / "empty", show_progress=False)
    assert not (tmp_path / "empty" / "config.yaml").exists()
    with pytest.raises(ResumeError, match="train.resume=false but .* already holds a run"):
        train(config("execution=loop", "train.resume=false"), finished_run, show_progress=False)


# --- 3. exact resume on every path and algorithm -----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["maml", "imaml", "entropy_sgd", "reptile"])
@pytest.mark.parametrize("execution", ["loop", "vmap", "auto"])
def test_crash_at_a_random_step_then_resume_is_bit_exact(tmp_path, request, algorithm, execution):
    if algorithm == "reptile":
        request.getfixturevalue("reptile")
    overrides = (f"execution={execution}",)
    train(config(*overrides, algorithm=algorithm), tmp_path / "straight", show_progress=False)
    step = random.Random().randrange(2, 8)
    with crash_after(algorithm, step), pytest.raises(Crash):
        train(config(*overrides, algorithm=algorithm), tmp_path / "crashed", show_progress=False)
    train(config(*overrides, algorithm=algorithm), tmp_path / "crashed", show_progress=False)
    assert_bit_equal(params_of(tmp_path / "crashed"), params_of(tmp_path / "straight"), f"crash at step {step}")


def test_auto_measurement_leaves_the_runs_random_state_alone(tmp_path, caplog):
    """Entropy-SGD draws noise from its own generator; the timing trial used to consume it."""
    caplog.set_level(logging.INFO)
    train(config("execution=auto", algorithm="entropy_sgd"), tmp_path / "auto", show_progress=False)
    assert "measured now" in caplog.text
    chosen = load_checkpoint(tmp_path / "auto" / "checkpoint.pt")["execution"]
    train(config(f"execution={chosen}", algorithm="entropy_sgd"), tmp_path / "explicit", show_progress=False)
    assert_bit_equal(params_of(tmp_path / "auto"), params_of(tmp_path / "explicit"))


def test_auto_is_recorded_cached_and_kept_on_resume(tmp_path, cache, caplog):
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    with crash_after("maml", 5), pytest.raises(Crash):
        train(config("execution=auto"), run_dir, show_progress=False)
    chosen = load_checkpoint(run_dir / "checkpoint.pt")["execution"]
    assert f"execution: {chosen}" in (run_dir / "config.yaml").read_text()
    assert "measured now" in caplog.text
    caplog.clear()
    train(config("execution=auto"), tmp_path / "second", show_progress=False)
    assert f"(execution={chosen}): the faster way on this machine for this configuration, as measured once" in caplog.text
    other = "loop" if chosen == "vmap" else "vmap"
    measurements = json.loads((cache / "execution.json").read_text())
    for entry in measurements.values():
        entry["path"] = other  # the cache now says otherwise: a resumed run must keep its path
    (cache / "execution.json").write_text(json.dumps(measurements))
    caplog.clear()
    train(config("execution=auto"), run_dir, show_progress=False)
    assert "as in the checkpoint being resumed" in caplog.text
    assert load_checkpoint(run_dir / "checkpoint.pt")["execution"] == chosen
    texts = [e for path in event_files(run_dir) for e in LegacyEventFileLoader(str(path)).Load()
             if any(v.tag.startswith("run/execution") for v in e.summary.value)]
    assert texts, "the chosen path is in TensorBoard as text"


@pytest.mark.parametrize("algorithm, execution", [("maml", "auto"), ("entropy_sgd", "auto"), ("imaml", "vmap")])
def test_kill_9_at_a_random_step_then_resume_is_bit_exact(tmp_path, cache, algorithm, execution):
    args = cli_overrides(algorithm, f"execution={execution}", "train.checkpoint_every=1")
    step = random.Random().randrange(2, 8)
    killed = run_cli([str(ROOT / "tests" / "fault_driver.py"), algorithm, str(step), "KILL", *args,
                      f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, cache)
    assert killed.returncode == -9, killed.stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == step - 1
    resumed = run_cli(["-m", "bilevel.app.train", *args, "train.resume=auto", f"hydra.run.dir={tmp_path / 'run'}"],
                      tmp_path, cache)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path / 'run' / 'checkpoint.pt'} at step {step - 1}" in resumed.stdout
    chosen = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["execution"]
    train(config(f"execution={chosen}", "train.checkpoint_every=1", algorithm=algorithm), tmp_path / "straight",
          show_progress=False)
    assert_bit_equal(params_of(tmp_path / "run"), params_of(tmp_path / "straight"), f"kill -9 after step {step}")


# --- 4. one run per directory, and a clean record --------------------------------------------------------


def test_second_run_in_a_busy_directory_fails_at_start_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    with FileLock(run_dir / "run.lock"):
        with pytest.raises(RunDirectoryBusy, match=rf"in use by another run \(pid {os.getpid()} on "):
            train(config(), run_dir, show_progress=False)
        assert [p.name for p in run_dir.iterdir()] == ["run.lock"]
    train(config(), run_dir, show_progress=False)  # released: the directory is usable again
    assert not (run_dir / "run.lock").exists()


def test_resume_truncates_tensorboard_to_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    with crash_after("maml", 8), pytest.raises(Crash):  # checkpoint at 6; points up to 7 and decomposition 6 after it
        train(config("execution=loop", "train.checkpoint_every=3"), run_dir, show_progress=False)
    first = events(run_dir)
    train(config("execution=loop", "train.checkpoint_every=3"), run_dir, show_progress=False)
    train(config("execution=loop", "train.checkpoint_every=3"), tmp_path / "straight", show_progress=False)
    resumed, straight = events(run_dir), events(tmp_path / "straight")
    for tag, points in resumed.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"{tag}: steps {steps} repeat or go back"
    assert [s for s, _ in first["train/loss"]] == list(range(1, 8))
    assert [s for s, _ in resumed["train/loss"]] == list(range(1, 9))
    assert resumed["train/loss"][:6] == first["train/loss"][:6]
    timeless = [tag for tag in straight if tag != "train/step_seconds"]
    assert {t: resumed[t] for t in timeless} == {t: straight[t] for t in timeless}  # as if never interrupted


def test_stale_temporary_files_and_metrics_of_an_interrupted_attempt_are_removed(finished_run):
    (finished_run / ".checkpoint.pt.abc123.tmp").write_bytes(b"partial")
    with crash_after("maml", 1), pytest.raises(Crash):  # the first step of the resumed attempt
        train(config("execution=loop", "train.steps=10", "train.resume=force"), finished_run, show_progress=False)
    assert not list(finished_run.glob(".*.tmp"))
    assert not (finished_run / "metrics.json").exists()  # it described step 8, the run is now past it


# --- 5. files we read are checked --------------------------------------------------------------------------


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: os.urandom(len(data)),
    "overwritten mid-file": lambda data: data[:2000] + bytes(1000) + data[3000:],
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_checkpoint_names_the_file_and_the_intact_previous_one(finished_run, corruption):
    latest = finished_run / "checkpoint.pt"
    assert load_checkpoint(finished_run / "checkpoint.prev.pt")["step"] == 6  # the last two are kept
    latest.write_bytes(CORRUPTIONS[corruption](latest.read_bytes()))
    with pytest.raises(CorruptFileError) as err:
        train(config("execution=loop"), finished_run, show_progress=False)
    message = str(err.value)
    print(message)
    assert f"{latest} is not a readable checkpoint file" in message
    assert f"The previous checkpoint {finished_run / 'checkpoint.prev.pt'} (step 6) is intact" in message
    assert f"mv {finished_run / 'checkpoint.prev.pt'} {latest}" in message


def _tiny_pool(seed: int, image_size: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (4, 20, image_size, image_size), dtype=torch.uint8, generator=generator)
    return images, [glyphs.GlyphInfo(chr(65 + i), "LATIN") for i in range(4)]


@pytest.mark.parametrize("corruption", ["overwritten mid-file", "truncated", "headerless (older format)"])
def test_corrupt_glyph_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog, corruption):
    builds = []
    monkeypatch.setattr(glyphs, "build_glyphs", lambda seed, size: builds.append(seed) or _tiny_pool(seed, size))
    glyphs.load_glyphs.cache_clear()
    images, _ = glyphs.load_glyphs(tmp_path, 0, 8)
    path = glyphs.cache_file(tmp_path, 0, 8)
    data = path.read_bytes()
    if corruption == "headerless (older format)":
        torch.save({"images": images}, path)
    else:
        path.write_bytes(CORRUPTIONS[corruption](data))
    glyphs.load_glyphs.cache_clear()
    with caplog.at_level(logging.WARNING):
        rebuilt, _ = glyphs.load_glyphs(tmp_path, 0, 8)
    glyphs.load_glyphs.cache_clear()
    assert len(builds) == 2 and torch.equal(rebuilt, images)
    assert f"{path} is not a readable glyphs file" in caplog.text and "rebuilding" in caplog.text
    assert path.read_bytes() == data and not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob(".*.tmp"))


def test_checked_file_refuses_another_format_version(tmp_path):
    save_checked({"x": 1}, tmp_path / "f.pt", "checkpoint", 99)
    with pytest.raises(CorruptFileError, match="format version 99, this code reads version 1"):
        load_checkpoint(tmp_path / "f.pt")


# --- 6. signals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, status", [("INT", 130), ("TERM", 143)])
def test_signal_finishes_the_step_checkpoints_and_prints_the_resume_command(tmp_path, cache, name, status):
    run_dir = tmp_path / "run"
    args = cli_overrides("entropy_sgd", "execution=loop", "train.checkpoint_every=4")
    stopped = run_cli([str(ROOT / "tests" / "fault_driver.py"), "entropy_sgd", "3", name, *args,
                       f"hydra.run.dir={run_dir}"], tmp_path, cache)
    assert stopped.returncode == status, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert f"stopped by SIG{name} after step 3; checkpoint: {run_dir / 'checkpoint.pt'} (step 3)" in stopped.stderr
    command = stopped.stderr.split("resume with: ", 1)[1].strip()
    assert command.startswith("bilevel-train ") and f"train.resume=auto hydra.run.dir={run_dir}" in command
    if name == "TERM":  # the printed command continues the run, bit for bit
        resumed = run_cli(["-m", "bilevel.app.train", *shlex.split(command)[1:]], tmp_path, cache)
        assert resumed.returncode == 0, resumed.stderr
        train(config("execution=loop", "train.checkpoint_every=4", algorithm="entropy_sgd"), tmp_path / "straight",
              show_progress=False)
        assert_bit_equal(params_of(run_dir), params_of(tmp_path / "straight"), "SIGTERM after step 3")


# --- 7. validation before any work ---------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden=0"], "model.hidden must be >= 1, got 0"),
    (["model.layers=0"], "model.layers must be >= 1, got 0"),
    (["algorithm.test_steps=-1"], "algorithm.test_steps must be >= 1, got -1"),
    (["eval.final_tasks=0"], "eval.final_tasks must be >= 1, got 0"),
    (["eval.tasks=0"], "eval.tasks must be >= 1, got 0"),
    (["train.meta_batch=100000000"], "train.meta_batch=100000000 needs an estimated"),
    (["+train.stesp=3"], "unknown config key train.stesp: did you mean train.steps?"),
    (["+bogus=1"], "unknown config key bogus: valid keys of the top level: algorithm, model,"),
    (["+model.depth=3"], "unknown config key model.depth"),
    (["data.ways=1"], "data.ways must be >= 2, got 1"),
    (["data.shots=0"], "data.shots must be >= 1, got 0"),
    (["algorithm.inner_lr=-0.4"], "algorithm.inner_lr must be > 0, got -0.4"),
    (["algorithm=entropy_sgd", "algorithm.ema=1.5"], "algorithm.ema must be in (0, 1], got 1.5"),
    (["algorithm=imaml", "algorithm.cg_iters=0"], "algorithm.cg_iters must be >= 1, got 0"),
    (["train.lr=0"], "train.lr must be > 0, got 0.0"),
    (["train.checkpoint_every=0"], "train.checkpoint_every must be >= 1, got 0"),
    (["train.resume=maybe"], "train.resume must be one of auto, true, false, force, got 'maybe'"),
    (["dtype=float16"], "dtype must be one of float32, float64, got 'float16'"),
    (["head.policy=zero"], "head.policy must be one of random, scaled, zero_init, zeroing, got 'zero'"),
])
def test_bad_values_fail_before_any_work_naming_the_key_and_range(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        train(config(*overrides), tmp_path / "run", show_progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset", ["maml", "fomaml", "anil", "imaml", "entropy_sgd"])
def test_memory_estimate_admits_the_default_runs(preset):
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        cfg = typed_config(compose("train", overrides=[f"algorithm={preset}"]))
    model = build_model(cfg.model, (1, 28, 28), cfg.data.ways)
    algorithm = engine.build_algorithm(cfg.algorithm, model)
    assert memory_plans(model, (1, 28, 28), cfg, algorithm, torch.device("cpu"), torch.float32)


def test_cli_prints_a_config_error_without_traceback_and_exits_2(tmp_path, cache):
    result = run_cli(["-m", "bilevel.app.train", *cli_overrides("maml", "model.hidden=0"), f"hydra.run.dir={tmp_path / 'run'}"],
                     tmp_path, cache)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: model.hidden must be >= 1, got 0"
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# --- 8. faults that ended in a traceback, lost work or ran on nonsense (issue 23) -------------------------


def drive(cases: list[dict], cache: Path) -> list[dict]:
    """Run ``bilevel-train`` command lines through ``tests/cli_driver.py`` (one import, a fork each)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", BILEVEL_ALLOCATOR="default",
               BILEVEL_CACHE=str(cache))
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_driver.py")], input=json.dumps(cases), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_run_directories_and_caches_that_cannot_be_used_are_said_in_one_paragraph(tmp_path, cache):
    """A run directory that is a file, under a file, in a virtual file system; a checkpoint.pt that is
    a directory; BILEVEL_CACHE naming a file: exit 2 (1 for the unreadable checkpoint), no traceback."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "old" / "checkpoint.pt").mkdir(parents=True)
    cases = {
        "a file": ([f"hydra.run.dir={tmp_path / 'a_file'}"], 2, "cannot make the run directory"),
        "under a file": ([f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"], 2, "Not a directory"),
        "a system folder": (["hydra.run.dir=/proc/bilevel-run"], 2, "cannot make the run directory '/proc/bilevel-run'"),
        "checkpoint.pt a directory": ([f"hydra.run.dir={tmp_path / 'old'}"], 1,
                                      f"{tmp_path / 'old' / 'checkpoint.pt'} is not a readable checkpoint file: is a "
                                      "directory"),
        "BILEVEL_CACHE a file": ([f"hydra.run.dir={tmp_path / 'cached'}"], 2,
                                 f"BILEVEL_CACHE={tmp_path / 'a_file'} cannot be a directory"),
    }
    runs = []
    for i, (name, (args, _, _)) in enumerate(cases.items()):
        (tmp_path / f"cwd{i}").mkdir()
        env = {"BILEVEL_CACHE": str(tmp_path / "a_file")} if name == "BILEVEL_CACHE a file" else {}
        runs.append({"args": cli_overrides("maml", *args), "cwd": str(tmp_path / f"cwd{i}"), "env": env})
    for (name, (_, status, message)), result in zip(cases.items(), drive(runs, cache)):
        assert result["status"] == status, (name, result["stderr"])
        assert "Traceback" not in result["stderr"], (name, result["stderr"])
        assert message in result["stderr"], (name, result["stderr"])
    assert not (tmp_path / "cached").exists()  # refused before the run directory was taken
    assert (tmp_path / "old" / "checkpoint.pt").is_dir() and (tmp_path / "a_file").read_text() == "x"


def test_an_execution_cache_holding_a_list_is_ignored_and_measured_again(tmp_path, cache, caplog):
    cache.mkdir(parents=True)
    (cache / "execution.json").write_text("[1, 2]")
    with caplog.at_level(logging.WARNING):
        train(config("execution=auto"), tmp_path / "run", show_progress=False)
    assert "holds a JSON list, not an object; measuring again" in caplog.text
    assert isinstance(json.loads((cache / "execution.json").read_text()), dict)


def test_a_stale_cached_path_measurement_is_dropped_when_the_steps_disagree(tmp_path, cache, caplog):
    """Measured under other load: a cached time 1000x off the run's own steps is dropped (the
    next start measures again), and a run's path never changes mid-run."""
    train(config("execution=auto"), tmp_path / "first", show_progress=False)
    entries = json.loads((cache / "execution.json").read_text())
    assert all("load" in e for e in entries.values())  # the load it was measured under
    for entry in entries.values():
        entry["seconds"] = {path: seconds * 1000 for path, seconds in entry["seconds"].items()}
    (cache / "execution.json").write_text(json.dumps(entries))
    with caplog.at_level(logging.INFO):
        train(config("execution=auto"), tmp_path / "second", show_progress=False)
    assert "as measured once before under load" in caplog.text
    assert "the measurement is dropped and the next run measures again" in caplog.text
    assert json.loads((cache / "execution.json").read_text()) == {}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(config("execution=auto"), tmp_path / "third", show_progress=False)
    assert "measured now under load" in caplog.text and "dropped" not in caplog.text


def test_deleting_run_lock_lets_no_second_run_in(tmp_path):
    from bilevel.app.lifecycle.run_dir import RunDirectory

    with RunDirectory(tmp_path / "run"):
        (tmp_path / "run" / "run.lock").unlink()
        with pytest.raises(RunDirectoryBusy, match="record was deleted"):
            RunDirectory(tmp_path / "run").__enter__()


def test_a_full_disk_at_start_leaves_no_empty_run_lock(tmp_path, monkeypatch):
    import errno

    import bilevel.files as files

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "write", full)
    with pytest.raises(StorageError, match="No space left on device"):
        train(config(), tmp_path / "run", show_progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "run.lock").exists()


def test_tensorboard_directory_deleted_mid_run_is_made_again(tmp_path, caplog):
    import shutil

    cls, count = get_algorithm("maml"), [0]
    step_done = cls.outer_step_done

    def outer_step_done(self) -> None:
        step_done(self)
        count[0] += 1
        if count[0] == 3:
            shutil.rmtree(tmp_path / "run" / "tb")

    cls.outer_step_done = outer_step_done
    try:
        with caplog.at_level(logging.WARNING):
            metrics = train(config("execution=loop"), tmp_path / "run", show_progress=False)
    finally:
        del cls.outer_step_done
    assert metrics["steps"] == 8 and "was deleted during the run; made it again" in caplog.text
    assert event_files(tmp_path / "run") and load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 8


class _InfiniteLoss(_SpoiledFromStep3):
    """The reported meta-loss is 1e300 (finite in float64, inf in any float32 log) from step 3 on."""

    def spoil(self, step):
        step.loss = step.loss * 0 + 1e300


def test_a_float64_loss_beyond_float32_range_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "_REGISTRY", dict(engine._REGISTRY))
    register("inf_loss_maml")(_InfiniteLoss)
    _InfiniteLoss.calls = 0
    with pytest.raises(NonFiniteError, match=r"non-finite values in the meta-loss at step 3,.*beyond float32's range"):
        train(config("algorithm.name=inf_loss_maml", "dtype=float64", "execution=loop"), tmp_path, show_progress=False)
    assert not (tmp_path / "metrics.json").exists()


def test_ctrl_c_with_the_console_pipe_closed_keeps_the_checkpoint_and_says_how_to_resume(tmp_path, cache):
    """``bilevel-train ... 2>&1 | tee log`` and Ctrl-C, pressed twice 50 ms apart: tee dies first; the
    run must survive writing to a pipe nobody reads, take the double press as one, checkpoint, and
    leave the resume command in train.log."""
    run_dir = tmp_path / "run"
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the signal
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", BILEVEL_ALLOCATOR="default",
               BILEVEL_CACHE=str(cache))
    env.pop("HYDRA_FULL_ERROR", None)
    args = cli_overrides("maml", "execution=loop", "train.checkpoint_every=4", f"hydra.run.dir={run_dir}")
    status = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_driver.py"), "maml", "3", "INT2", *args],
                            cwd=tmp_path, env=env, stdout=write, stderr=write, timeout=120).returncode
    os.close(write)
    assert status == 130
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 3
    log = (run_dir / "train.log").read_text()
    assert "stopped by SIGINT after step 3" in log and f"train.resume=auto hydra.run.dir={run_dir}" in log
    assert "Traceback" not in log


def test_sigint_at_start_up_twice_exits_130_without_a_traceback_and_leaves_nothing(tmp_path, cache):
    run_dir = tmp_path / "run"
    args = cli_overrides("maml", "execution=loop", f"hydra.run.dir={run_dir}")
    stopped = run_cli([str(ROOT / "tests" / "fault_driver.py"), "maml", "0", "INT2", *args], tmp_path, cache)
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr.strip() == "interrupted by SIGINT before the run started; nothing was written"
    assert not run_dir.exists()


def test_model_that_cannot_take_the_inputs_is_refused_naming_the_image_size():
    from bilevel.app.config.preflight import check_model

    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        cfg = typed_config(compose("train", overrides=["data.image_size=8", "model=conv4"]))
    with pytest.raises(ConfigError, match=r"model=conv4 .*images must be at least 16x16; got 8x8: set data.image_size >= 16"):
        check_model(cfg, (1, 8, 8), torch.device("cpu"), torch.float32)


def _burn(seconds: float) -> None:
    end = __import__("time").perf_counter() + seconds
    while __import__("time").perf_counter() < end:
        pass


def test_the_final_test_is_the_same_on_an_idle_and_a_busy_machine(tmp_path):
    """The final test's task count and accuracy do not depend on the machine's load: the same
    command, alone and beside CPU-burning processes, tests the same tasks."""
    import multiprocessing

    overrides = ("execution=loop", "eval.final_tasks=60", "eval.batch=20", "train.steps=4")
    idle = train(config(*overrides), tmp_path / "idle", show_progress=False)
    burners = [multiprocessing.get_context("fork").Process(target=_burn, args=(120,)) for _ in range(2)]
    for b in burners:
        b.start()
    try:
        busy = train(config(*overrides), tmp_path / "busy", show_progress=False)
    finally:
        for b in burners:
            b.kill()
            b.join()
    assert idle["test_tasks"] == busy["test_tasks"] == 60
    assert idle["test_accuracy"] == busy["test_accuracy"]
