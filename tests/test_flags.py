"""Flags generated from the config dataclasses: one definition per setting, its help on the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pipeline.cache.format import CodecConfig
from pipeline.dump import DumpConfig
from pipeline.inputs.audio import AudioPolicy
from pipeline.train.data import LoaderConfig
from pipeline.train.loop import TrainConfig
from stages import dump_hidden, eval_draft, regenerate, train_draft
from stages.flags import add_flags, config_from_args


def dump_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p, DumpConfig, positional=("shards", "out"))
    return p


def test_defaults_are_the_dataclass_defaults():
    cfg = dump_hidden.parse_args(["s.tar", "out"])
    assert cfg == DumpConfig(shards="s.tar", out=Path("out"))


def test_every_kind_of_field_and_nested_configs():
    cfg = dump_hidden.parse_args(
        ["s.tar", "out", "--layers", "2,16,29", "--dtype", "bfloat16", "--strict", "--max-audio-seconds", "12.5",
         "--overlong-audio", "reject", "--codec", "lz4", "--level", "5", "--chunk-tokens", "64"]
    )  # fmt: skip
    assert cfg.layers == [2, 16, 29] and cfg.dtype == "bfloat16" and cfg.strict
    assert cfg.audio == AudioPolicy(max_seconds=12.5, overlong="reject")
    assert cfg.codec == CodecConfig(cname="lz4", clevel=5, chunk_tokens=64)


def test_help_comes_from_the_setting(capsys):
    with pytest.raises(SystemExit):
        dump_hidden.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "truncate prompts to this many tokens (default: 2048)" in text
    assert "a clip over --max-audio-seconds is cut to it, or rejected (default: cut)" in text
    assert "--sampling-rate" not in text  # flag=None: not on the command line


def test_bad_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit):
        dump_hidden.parse_args(["s.tar", "out", "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # rejected by the dataclass's own check, reported as a usage error
        regenerate.parse_args(["s.tar", "out", "--batch-size", "0"])
    assert "max_new_tokens and batch_size must be positive" in capsys.readouterr().err


def test_train_config_file_under_the_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lr": 0.01, "name": "from-file", "layers": [1, 2, 3]}))
    cfg = train_draft.parse_args(["cache", "--config", str(path), "--name", "from-flag"])
    assert (cfg.lr, cfg.name, cfg.layers) == (0.01, "from-flag", [1, 2, 3])
    path.write_text(json.dumps({"learning_rate": 0.01}))
    with pytest.raises(SystemExit):
        train_draft.parse_args(["cache", "--config", str(path)])


def test_shared_settings_have_one_default():
    """The loader and the training run read the same definitions (they once disagreed on eval_percent)."""
    run, loader = TrainConfig(cache="c"), LoaderConfig(layers=[1])
    for name in ("max_tokens", "audio_embeds", "eval_percent", "num_workers", "seed"):
        assert getattr(run, name) == getattr(loader, name), name


def test_eval_flags():
    cfg = eval_draft.parse_args(["runs/x", "s.tar", "--k", "3", "--split", "all", "--serve", "vllm"])
    assert (cfg.draft, cfg.shards, cfg.k, cfg.split, cfg.serve) == ("runs/x", "s.tar", 3, "all", "vllm")


def test_a_nested_config_kept_whole_keeps_its_default():
    from pipeline.testing.small_target import SmallTargetConfig
    from stages.bench import train_small_target

    _, cfg = train_small_target.parse_args(["/nonexistent/out", "--steps", "3"])
    assert cfg == SmallTargetConfig(steps=3)  # tones (flag=None) is the config's own default, not ToneConfig()
    assert config_from_args(DumpConfig, dump_parser().parse_args(["a", "b"])).codec == CodecConfig()
