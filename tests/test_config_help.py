"""Every config key is documented with its default: `psb-fast config`, `train --help`; threads."""

import pytest
import torch

from psb_fast.cli import main
from psb_fast.config import FIELD_HELP, TrainConfig, default_config_toml, field_names, load_config
from psb_fast.train import thread_count, train


def test_every_key_has_a_meaning():
    assert list(FIELD_HELP) == field_names()


def test_config_command_prints_a_loadable_default_config(tmp_path, capsys):
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert text == default_config_toml()
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert load_config(path) == TrainConfig()
    for name in field_names():
        assert f"\n{name} = " in text and FIELD_HELP[name] in text


def test_train_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name in field_names():
        assert f"  {name} " in text, name
    assert '"gmm-grid"' in text and "(default: cpu)" not in text


def test_subcommand_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    assert "(default: 64)" in text and "(default: 10)" in text and "power-<q>" in text


def test_threads_auto_and_explicit(tmp_path):
    cpu = torch.device("cpu")
    assert thread_count(TrainConfig(threads=3), (2,), cpu) == 3
    assert thread_count(TrainConfig(), (2,), cpu) == 1
    assert thread_count(TrainConfig(), (1, 8, 8), cpu) == torch.get_num_threads()
    with pytest.raises(ValueError, match="threads"):
        TrainConfig(threads=-1)
    before = torch.get_num_threads()
    seen = []
    cfg = TrainConfig(model="mlp", model_kwargs={"hidden": 8, "depth": 1}, batch_size=8, steps=1,
                      eval_samples=0, device="cpu", threads=2, out_dir=str(tmp_path / "r"))
    train(cfg, progress=False, callback=lambda info: seen.append(torch.get_num_threads()))
    assert seen == [2] and torch.get_num_threads() == before
