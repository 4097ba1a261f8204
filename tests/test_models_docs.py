"""docs/models.md's custom-encoder example runs as written: its ``my_encoders.py`` block is saved
as that file, its Python block is executed as is, and its command line trains."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from bilevel.app.config.schema import register_configs
from bilevel.app.train import train
from bilevel.primitives.batchnorm import SetBatchNorm

pytestmark = pytest.mark.usefixtures("single_thread")

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
SHORT_RUN = [
    "train.steps=2", "train.meta_batch=2", "train.eval_every=2", "train.decompose_every=1", "train.image_every=0",
    "eval.tasks=2", "eval.final_tasks=2", "eval.batch=2", "device=cpu", "execution=loop",
]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def user_directory(tmp_path, monkeypatch):
    """A directory holding the docs' ``my_encoders.py``, importable and current, as in the docs."""
    (module,) = [b for b in blocks("python") if b.startswith("# my_encoders.py")]
    (tmp_path / "my_encoders.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_python_example_runs_as_written(user_directory, capsys):
    (example,) = [b for b in blocks("python") if "BilevelModel.from_encoder" in b]
    scope: dict = {}
    exec(compile(example, str(DOC), "exec"), scope)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["vmap", "loop"]
    assert any(isinstance(m, SetBatchNorm) for m in scope["model"].modules())
    for line in lines:
        identity, versus = (float(x) for x in re.findall(r"identity (\S+), vs plain autograd (\S+)", line)[0])
        assert identity < 1e-5 and versus < 1e-5, line


def test_command_line_example_trains(user_directory):
    (command,) = [line for b in blocks("bash") for line in b.splitlines() if "model=custom" in line]
    args = shlex.split(command)
    overrides = args[args.index("bilevel.app.train") + 1:]
    register_configs()
    with initialize_config_module("configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides + SHORT_RUN)
    metrics = train(cfg, user_directory / "run", show_progress=False)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert cfg.model.target == "my_encoders.SmallConv" and cfg.model.kwargs == {"width": 16}
