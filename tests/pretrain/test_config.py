from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Literal

import pytest

from pretrain.config import (
    PRESET_DIR,
    BatchPlan,
    Config,
    ConfigError,
    config_from_dict,
    flatten,
    load_config,
    save_config,
)


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
def test_presets_load(preset: str) -> None:
    cfg = load_config(preset)
    assert cfg.run.name == preset


def test_required_presets_exist() -> None:
    names = {p.stem for p in PRESET_DIR.glob("*.toml")}
    assert {"tiny-cpu", "vits14-gmmix", "vitl16-gmmix"} <= names


def test_precedence_defaults_preset_override() -> None:
    assert Config().train.steps == 400
    assert load_config("tiny-cpu").train.steps == 300
    cfg = load_config("tiny-cpu", ["--train.steps=7", "--core.kind=mamba", "--train.lr=1"])
    assert (cfg.train.steps, cfg.core.kind, cfg.train.lr) == (7, "mamba", 1.0)
    assert isinstance(cfg.train.lr, float)


def test_list_and_string_overrides() -> None:
    cfg = load_config(None, ['--data.videos=["a.mp4", "b.mp4"]', "--run.name=my-run", "--encoder.source=/x/y"])
    assert cfg.data.videos == ["a.mp4", "b.mp4"]
    assert cfg.run.name == "my-run"
    assert cfg.encoder.source == "/x/y"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("--core.kindd=gmmix", "core.kindd"),
        ("--nosuch.key=1", "nosuch"),
        ("--core.dim=abc", "core.dim"),
        ("--core.dim=2.5", "core.dim"),
        ("--core.kind=lstm", "core.kind"),
        ("--train.lr=-1", "train.lr"),
        ("--train.progress=1", "train.progress"),
        ("--objective.visible_fraction=1.5", "objective.visible_fraction"),
        ("--objective.target_offsets=[0, 1]", "objective.target_offsets"),
        ("--core.num_heads=3", "core.dim"),
        ("--encoder.attn_backend=flash3", "encoder.attn_backend"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny-cpu", [override])


def test_unknown_key_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(str(path))


def test_missing_preset_lists_known() -> None:
    with pytest.raises(ConfigError, match="tiny-cpu"):
        load_config("no-such-preset")


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match=r"section\.key"):
        load_config(None, ["--steps=3"])


def test_roundtrip_and_flatten(tmp_path: Path) -> None:
    cfg = load_config("tiny-cpu", ["--train.steps=11"])
    save_config(cfg, tmp_path / "c.json")
    again = config_from_dict(json.loads((tmp_path / "c.json").read_text()))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["train.steps"] == 11 and flat["core.kind"] == "gmmix"


def test_batch_plan() -> None:
    cfg = load_config(None, ["--train.micro_batch_size=4", "--train.grad_accum=3"])
    plan = cfg.batch_plan(world_size=2)
    assert plan == BatchPlan(micro_batch_size=4, grad_accum=3, world_size=2, global_batch_size=24)
    with pytest.raises(ConfigError):
        cfg.batch_plan(world_size=0)


@pytest.mark.parametrize(("world", "accum"), [(1, 6), (2, 3), (3, 2), (6, 1)])
def test_global_batch_size_sets_accumulation(world: int, accum: int) -> None:
    cfg = load_config(None, ["--train.micro_batch_size=4", "--train.global_batch_size=24"])
    assert cfg.batch_plan(world_size=world) == BatchPlan(4, accum, world, 24)


def test_a_global_batch_that_does_not_divide_names_the_keys() -> None:
    cfg = load_config(None, ["--train.micro_batch_size=4", "--train.global_batch_size=24"])
    with pytest.raises(ConfigError, match=r"train\.global_batch_size.*train\.micro_batch_size=4.*world size 4"):
        cfg.batch_plan(world_size=4)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size.*train\.micro_batch_size=4"):
        load_config(None, ["--train.micro_batch_size=4", "--train.global_batch_size=10"])
    # Accumulation is derived from the global batch: both set is ambiguous.
    with pytest.raises(ConfigError, match=r"train\.grad_accum.*train\.global_batch_size"):
        load_config(None, ["--train.global_batch_size=24", "--train.grad_accum=2"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("--run.device=tpu", "run.device"),
        ("--encoder.compile_mode=fast", "encoder.compile_mode"),
        ("--objective.memory=first", "objective.memory"),
        ("--data.source=frames", "data.source"),
        ("--train.resume=maybe", "train.resume"),
        ("--distributed.engine=fsdp", "distributed.engine"),
        ("--distributed.backend=mpi", "distributed.backend"),
        ("--distributed.precision=fp16", "distributed.precision"),
        ("--distributed.optimizer=sgd", "distributed.optimizer"),
    ],
)
def test_choice_fields_refuse_other_values(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*expected one of"):
        load_config("tiny-cpu", [override])


def test_choice_fields_are_literal_types() -> None:
    """Every choice is a Literal, so the loader (and a type checker) knows the allowed values."""
    cfg = Config()
    choices = set()
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(type(getattr(cfg, section.name)))
        choices |= {(section.name, name) for name, hint in hints.items() if typing.get_origin(hint) is Literal}
    assert {
        ("run", "device"),
        ("encoder", "attn_backend"),
        ("encoder", "compile_mode"),
        ("core", "kind"),
        ("objective", "memory"),
        ("data", "source"),
        ("train", "resume"),
        ("distributed", "engine"),
        ("distributed", "backend"),
        ("distributed", "precision"),
        ("distributed", "optimizer"),
    } <= choices


def test_presets_keep_their_batches() -> None:
    """Effective batches of the shipped presets (one rank), so a preset edit that changes them is seen."""
    expected = {"tiny-cpu": (8, 1), "procedural-cpu": (16, 1), "vits14-gmmix": (32, 1), "vitl16-gmmix": (16, 2)}
    for name, (micro, accum) in expected.items():
        plan = load_config(name).batch_plan(world_size=1)
        assert (plan.micro_batch_size, plan.grad_accum, plan.global_batch_size) == (micro, accum, micro * accum)


def test_a_retired_key_is_refused_from_a_user_but_dropped_from_a_recorded_config() -> None:
    from pretrain.config import RETIRED_KEYS, config_to_dict, recorded_config

    assert "data.max_frames" in RETIRED_KEYS
    with pytest.raises(ConfigError, match=r"data\.max_frames' was removed"):
        load_config("tiny-cpu", ["--data.max_frames=24"])
    recorded = config_to_dict(load_config("tiny-cpu"))
    recorded["data"]["max_frames"] = 24
    assert config_to_dict(recorded_config(recorded)) == config_to_dict(load_config("tiny-cpu"))


@pytest.mark.parametrize("preset", ["tiny-cpu", "vits14-gmmix", "procedural-cpu"])
def test_print_config_is_a_preset_that_loads_back(preset: str, tmp_path: Path) -> None:
    from pretrain.config import describe_config

    cfg = load_config(preset, ["--train.steps=7", "--core.kind=mamba"])
    text = describe_config(cfg)
    assert "steps = 7  # default:" in text and "# Steps between held-out evaluations" in text
    path = tmp_path / "printed.toml"
    path.write_text(text)
    assert load_config(str(path)) == cfg


def test_every_config_key_has_a_docstring() -> None:
    import dataclasses

    from pretrain.config import Config, field_docs

    missing = [
        f"{section.name}.{key.name}"
        for section in dataclasses.fields(Config)
        for key in dataclasses.fields(getattr(Config(), section.name))
        if not field_docs(type(getattr(Config(), section.name))).get(key.name)
    ]
    assert not missing, f"config keys without a docstring (--print-config shows them bare): {missing}"


def test_train_cli_prints_the_config_and_lists_sections(capsys: pytest.CaptureFixture[str]) -> None:
    from pretrain import train as train_cli

    assert train_cli.main(["--config", "tiny-cpu", "--print-config", "--train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[run]") and "steps = 3" in out
    assert train_cli.main(["--config", "tiny-cpu", "--print-config", "--train.nope=3"]) == 2
    assert "train.nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    assert "[objective]" in capsys.readouterr().out
