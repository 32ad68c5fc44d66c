"""Every config key is documented with its default: `psb-fast config`, `train --help`; threads."""

import pytest
import torch

from psb_fast.cli import main
from psb_fast.config import (
    FIELD_HELP,
    TrainConfig,
    apply_overrides,
    default_config_toml,
    field_names,
    load_config,
)
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
    assert thread_count(TrainConfig(), (1, 8, 8), cpu) == 1  # 256 x 64 elements: below SMALL_WORK
    assert thread_count(TrainConfig(batch_size=64), (3, 32, 32), cpu) == torch.get_num_threads()
    with pytest.raises(ValueError, match="threads"):
        TrainConfig(threads=-1)
    before = torch.get_num_threads()
    seen = []
    cfg = TrainConfig(model="mlp", model_kwargs={"hidden": 8, "depth": 1}, batch_size=8, steps=1,
                      eval_samples=0, device="cpu", threads=2, out_dir=str(tmp_path / "r"))
    train(cfg, progress=False, callback=lambda info: seen.append(torch.get_num_threads()))
    assert seen == [2] and torch.get_num_threads() == before


# --- adversarial configs: one line, exit 2 (D14, D15, D19) ---------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("deep.toml", b"x = " + b"[" * 5000 + b"]" * 5000, "config file '.*deep.toml' nests deeper than"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "config file '.*deep.json' nests deeper than"),
    ("bin.toml", b"\xff\xd8\xff\xe0 jpeg", r"config file '.*bin.toml' is not UTF-8 text \(byte 0xff"),
    ("bin.json", b'{"lr": 1e-3}\x80', r"config file '.*bin.json' is not UTF-8 text \(byte 0x80"),
    ("twice.json", b'{"lr": 1e-3, "lr": 2e-3}', "config file '.*twice.json' repeats the key 'lr'"),
])
def test_unreadable_config_files_exit_2_in_one_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_config(path)
    assert main(["train", "--config", str(path), "--set", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("psb-fast train: error: config file ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("lr=1e39", r"lr must be in \(0, 1e\+06\], got 1e\+39"),
    ("weight_decay=1e30", r"weight_decay must be in \[0, 1e\+06\], got 1e\+30"),
    ("model_kwargs.hidden=100000000", "model_kwargs.hidden must be at most 65536 in size .* got 100000000"),
    ('model_kwargs={"mults": [1, 2, 1000000]}', r"model_kwargs.mults\[2\] must be at most 65536"),
    ("model_kwargs.dropout=1e400", "model_kwargs.dropout must be finite, got inf"),
    ("model_kwargs.x=" + "[" * 100_000, "nests deeper than Python can parse"),
])
def test_absurd_values_are_refused_at_validation(tmp_path, capsys, override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), [override])
    assert main(["train", "--set", override, "--set", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("psb-fast train: error: ")
    assert not (tmp_path / "run").exists()
    apply_overrides(TrainConfig(), ["lr=1e6", "weight_decay=1e6", "model_kwargs.hidden=65536"])  # the edges
