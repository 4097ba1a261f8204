"""The error table: every refused command line exits 2 with one paragraph and no traceback,
and leaves no run directory behind (``docs/reliability.md`` §6, README "Errors you may meet").

Each case runs ``bilevel-train`` (``tests/cli_driver.py``: one import, a forked child per
command line) in a fresh working directory, so Hydra's default ``outputs/<date>/<time>`` would
be made there, with the Reptile example installed as a plugin (a dist-info on ``PYTHONPATH``,
as ``test_example_plugin.py`` does): the one list of algorithms holds presets, built-in
plugins and an installed one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from bilevel.algorithm import available_algorithms, get_algorithm
from bilevel.app.config.schema import TrainConfig
from bilevel.validate import declared_checks

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data=synthetic", "model=mlp", "model.hidden=8", "train.steps=2", "eval.tasks=2", "eval.final_tasks=2",
        "device=cpu"]

CASES = {
    "misspelt key": (["train.stesp=3"], "unknown config key train.stesp: did you mean train.steps? valid keys of train:"),
    "misspelt key added with +": (["+train.stesp=3"], "unknown config key train.stesp: did you mean train.steps?"),
    "misspelt group": (["trian.steps=3"], "unknown config key trian.steps: did you mean train.steps?"),
    "misspelt algorithm key": (["algorithm.inner_lrr=1"], "did you mean algorithm.inner_lr? valid keys of algorithm:"),
    "not an integer": (["train.steps=abc"], "train.steps must be an integer, got 'abc'"),
    "not a number": (["head.scale=abc"], "head.scale must be a number, got 'abc'"),
    "not a boolean": (["data.fixed_labels=maybe"], "data.fixed_labels must be true or false, got 'maybe'"),
    "malformed override": (["train.steps=[1"], "cannot read the command line"),
    "negative learning rate": (["train.lr=-1"], "train.lr must be > 0, got -1.0"),
    "zero inner learning rate": (["algorithm.inner_lr=0"], "algorithm.inner_lr must be > 0, got 0"),
    "iMAML lam": (["algorithm=imaml", "algorithm.lam=0"], "algorithm.lam must be > 0, got 0"),
    "Entropy-SGD gamma0": (["algorithm=entropy_sgd", "algorithm.gamma0=-1"], "algorithm.gamma0 must be > 0"),
    "Entropy-SGD gamma1": (["algorithm=entropy_sgd", "algorithm.gamma1=-1"], "algorithm.gamma1 must be >= 0"),
    "Entropy-SGD noise": (["algorithm=entropy_sgd", "algorithm.noise=-1"], "algorithm.noise must be >= 0"),
    "Entropy-SGD ema": (["algorithm=entropy_sgd", "algorithm.ema=1.5"], "algorithm.ema must be in (0, 1], got 1.5"),
    "misspelt algorithm": (["algorithm=reptil"], "unknown algorithm 'reptil' (algorithm=reptil); did you mean reptile? "
                           "choose algorithm=NAME from: anil, entropy_sgd, fomaml, imaml, maml, meta_sgd, r2d2, reptile"),
    "misspelt plugin name": (["algorithm.name=reptil"], "unknown algorithm 'reptil' (algorithm.name=reptil); did you "
                             "mean reptile? choose algorithm=NAME from: anil, entropy_sgd, fomaml, imaml, maml, meta_sgd, r2d2, reptile"),
    "a preset as a plugin name": (["algorithm.name=fomaml"], "names a preset, not a plugin: select it with algorithm=fomaml"),
    "misspelt data set": (["data=synthtic"], "unknown data 'synthtic' (data=synthtic); did you mean synthetic?"),
    "headline past the test steps": (["eval.headline_step=9"], "eval.headline_step must be <= the test-time inner steps"),
    "more ways than classes": (["data.ways=500"], "classes"),
    "unavailable execution path": (["execution=shared"], "execution=shared is not available"),
    "resume without a checkpoint": (["train.resume=true"], "holds no checkpoint to continue"),
    # NaN and infinities, for every kind of numeric key (issue 20 §4, issue 23 §5)
    "NaN learning rate": (["train.lr=nan"], "train.lr must be > 0 (a finite number), got nan"),
    "infinite inner learning rate": (["algorithm.inner_lr=inf"], "algorithm.inner_lr must be > 0 (a finite number), got inf"),
    "negative infinite learning rate": (["train.lr=-inf"], "train.lr must be > 0 (a finite number), got -inf"),
    "NaN head scale": (["head.scale=nan"], "head.scale must be >= 0 (a finite number), got nan"),
    "NaN budget": (["eval.budget_s=nan"], "eval.budget_s must be >= 0 (a finite number), got nan"),
    "infinite budget": (["eval.budget_s=inf"], "eval.budget_s must be >= 0 (a finite number), got inf"),
    "NaN timeout": (["dist.timeout_s=nan"], "dist.timeout_s must be > 0 (a finite number), got nan"),
    # silent nonsense before: each ran and exited 0
    "no test steps": (["algorithm.test_steps=0"], "algorithm.test_steps must be >= 1, got 0"),
    "empty run directory": (["hydra.run.dir="], "hydra.run.dir is empty: the run would write its checkpoint"),
    "a deleted group": (["~train"], "'~train' deletes 'train' from the config"),
    "Entropy-SGD's unused train.lr": (["algorithm=entropy_sgd", "train.lr=0.1"],
                                      "algorithm entropy_sgd does not use train.lr=0.1"),
    # tracebacks before
    "an override without a key": (["=3"], "cannot read the command line: '=3' has no key before '='"),
    "a 300-character directory name": (["hydra.run.dir=runs/" + "x" * 300], "hydra.run.dir holds a name of 300 bytes"),
    "a 5,000-character option": (["data=" + "y" * 5000], "longer than the file system allows"),
    "a 5,000-character value": (["train.resume=" + "y" * 5000], "(5002 characters)"),
    "a model too large to allocate": (["model.hidden=100000000"], "model=mlp has 10,000,002,300,000,005 parameters"),
    # misleading before
    "a plugin key its preset lacks": (["algorithm.inner_momentum=1"],
                                      "is a key of algorithm maml, but the selected preset does not list it, so it "
                                      "must be added: +algorithm.inner_momentum=1"),
    "classes before memory": (["data.ways=500", "train.meta_batch=100000000"], "500-way tasks need at least 500 classes"),
    "a missing data directory before memory": (["data=miniimagenet", "model=conv4", "data.root=missing"],
                                               "mini-ImageNet directory missing does not exist"),
}


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    """A ``PYTHONPATH`` on which the Reptile example is an installed plugin."""
    site = tmp_path_factory.mktemp("site")
    dist = site / "reptile_plugin-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: reptile_plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[bilevel.algorithms]\nreptile = reptile_plugin:Reptile\n")
    return os.pathsep.join([str(ROOT), str(site), str(ROOT / "examples" / "reptile_plugin")])


def cli_env(pythonpath: str, cache: Path) -> dict[str, str]:
    """The environment of a ``bilevel-train`` subprocess: one thread, no re-exec, its own cache."""
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1", BILEVEL_ALLOCATOR="default",
               BILEVEL_CACHE=str(cache))
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def bilevel_train(args: list[str], cwd: Path, pythonpath: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bilevel.app.train", *args], cwd=cwd, env=cli_env(pythonpath, cwd / "cache"),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def refused(tmp_path_factory, plugin_path) -> dict[str, dict]:
    """Every case of :data:`CASES`, run once: ``{case: {status, stdout, stderr, cwd}}``."""
    cases = []
    for i, name in enumerate(CASES):
        cwd = tmp_path_factory.mktemp(f"case{i}")
        cases.append({"args": FAST + CASES[name][0], "cwd": str(cwd)})
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_driver.py")], input=json.dumps(cases),
                          env=cli_env(plugin_path, tmp_path_factory.mktemp("cache")), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return {name: {**r, "cwd": Path(c["cwd"])} for name, c, r in zip(CASES, cases, json.loads(done.stdout))}


@pytest.mark.parametrize("case", CASES)
def test_a_refused_command_line_exits_2_with_one_paragraph_and_leaves_nothing(refused, case):
    result, message = refused[case], CASES[case][1]
    assert result["status"] == 2, result["stderr"]
    assert "Traceback" not in result["stderr"] and "HYDRA_FULL_ERROR" not in result["stderr"]
    lines = result["stderr"].strip().splitlines()
    assert lines[0].startswith("error: ") and "" not in lines, result["stderr"]  # one paragraph
    assert message in lines[0]
    assert len(lines) == 1 or case == "a missing data directory before memory"  # it lists the expected layout
    assert result["stdout"] == ""
    assert sorted(p.name for p in result["cwd"].iterdir()) == [], "a refused start left files behind"


def test_a_bug_keeps_its_traceback(tmp_path, plugin_path):
    """Not every failure is the user's: one that is not a refusal keeps its traceback (exit 1)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import bilevel.app.evaluation as e\n"
        "def broken(*args, **kwargs):\n    raise RuntimeError('a bug')\n"
        "e.headline_step = broken\n")
    result = bilevel_train(FAST, tmp_path, os.pathsep.join([str(tmp_path), plugin_path]))
    assert result.returncode == 1 and "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr


def _numeric(hint: typing.Any) -> bool:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint in (int, float) or (typing.get_origin(hint) is typing.Union and all(a in (int, float) for a in args))


def unchecked_numbers(cls: type, prefix: str = "", checked_above: frozenset[str] = frozenset()) -> list[str]:
    """The numeric fields of a config dataclass (and its nested ones) that no check declares."""
    checks = set(declared_checks(cls)) | checked_above
    hints = typing.get_type_hints(cls)
    missing = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            inner = frozenset(k[len(f.name) + 1:] for k in checks if k.startswith(f.name + "."))
            missing += unchecked_numbers(hint, f"{prefix}{f.name}.", inner)
        elif _numeric(hint) and f.name not in checks:
            missing.append(prefix + f.name)
    return missing


def test_every_numeric_key_is_range_checked(plugin_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "reptile_plugin"))
    from reptile_plugin import Reptile

    configs = {"train": TrainConfig, "reptile": Reptile.Config}
    configs.update({name: get_algorithm(name).Config for name in available_algorithms()})
    missing = {name: unchecked_numbers(cls) for name, cls in configs.items()}
    assert not any(missing.values()), missing
