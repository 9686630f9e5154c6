"""Typed configs: YAML + dotted overrides into dataclasses, strict keys and types, round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from evav.config import ConfigError, dump_yaml, load_config
from evav.frames import AudioSpec, RenderSpec


@dataclass
class Inner:
    depth: int = 2
    rate: float = 0.1
    kind: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "run"
    inner: Inner = field(default_factory=Inner)
    dirs: list[str] = field(default_factory=list)
    weights: tuple[float, ...] = (1.0,)
    limit: int | None = None
    flag: bool = False


def test_defaults_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: base\ninner:\n  depth: 4\n  rate: 0.5\n")
    cfg = load_config(Outer, path, ["inner.depth=8", "dirs=[a,b]", "weights=[1,2]", "flag=true"])
    assert cfg == Outer(
        name="base", inner=Inner(depth=8, rate=0.5), dirs=["a", "b"], weights=(1.0, 2.0), flag=True
    )


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'inner.deptj'.*did you mean 'depth'"
    ):
        load_config(Outer, None, ["inner.deptj=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'nmae'.*'name'"):
        load_config(Outer, None, ["nmae=x"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.depth=abc", "inner.depth: expected an integer"),
        ("inner.depth=1.5", "inner.depth: expected an integer"),
        ("inner.rate=fast", "inner.rate: expected a number"),
        ("inner.kind=c", r"inner.kind: 'c' is not one of \['a', 'b'\]"),
        ("flag=3", "flag: expected true/false"),
        ("dirs=abc", "dirs: expected a list"),
        ("limit=[1]", "limit"),
        ("inner=5", "inner: expected a mapping"),
        ("noequals", "expected dotted.key=value"),
    ],
)
def test_wrong_types_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_bad_yaml_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, tmp_path / "list.yaml")


def test_dump_and_load_round_trip_identically(tmp_path):
    cfg = load_config(Outer, None, ["inner.depth=7", "dirs=[x]", "weights=[0.25,0.75]", "limit=3"])
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    again = load_config(Outer, tmp_path / "resolved.yaml")
    assert again == cfg
    assert dump_yaml(again) == dump_yaml(cfg)


def test_render_spec_configs_in_repo_load_and_round_trip(tmp_path):
    from tests.conftest import REPO

    for path in sorted((REPO / "configs" / "render").glob("*.yaml")):
        spec = load_config(RenderSpec, path)
        assert spec.height == int(path.stem) and spec.width == int(path.stem)
        dump_yaml(spec, tmp_path / "r.yaml")
        assert load_config(RenderSpec, tmp_path / "r.yaml") == spec
        assert load_config(RenderSpec, tmp_path / "r.yaml").hash == spec.hash


def test_dataclass_validation_errors_surface_as_config_errors():
    with pytest.raises(ConfigError, match="frame size"):
        load_config(RenderSpec, None, ["height=4"])
    with pytest.raises(ConfigError, match="f_min < f_max"):
        load_config(RenderSpec, None, ["audio.f_max=99999"])
    assert load_config(RenderSpec, None, ["audio.n_mels=32"]).audio == AudioSpec(n_mels=32)


def test_exponent_floats_without_a_dot_are_numbers():
    """YAML 1.1 reads `3e-4` as a string; a float field still takes it as a number."""
    assert load_config(Outer, None, ["inner.rate=3e-4"]).inner.rate == 3e-4


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=-5", "steps=-5: must be at least 1"),
        ("steps=0", "steps=0: must be at least 1"),
        ("micro_batch=0", "micro_batch=0: must be at least 1"),
        ("data.clip_frames=1", "data.clip_frames=1: must be at least 2"),
        ("engine.grad_accum_steps=0", "engine.grad_accum_steps=0: must be at least 1"),
        ("model.preset=ZZ", "unknown model preset 'ZZ'"),
        ("data.train=[/nonexistent/evav-data]", "/nonexistent/evav-data does not exist"),
    ],
)
def test_train_mistakes_stop_before_any_process_group_with_one_line(override, message, capsys):
    """`evav train` checks its config before DeepSpeed and the process group start: exit 2 and
    one line naming the key, no traceback, no run directory written."""
    from pathlib import Path

    from evav.cli import main

    repo = Path(__file__).resolve().parents[1]
    rc = main(["train", str(repo / "configs" / "debug.yaml"), override, "run_dir=/nonexistent/r"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("evav train: error: ") and message in err and "\n" not in err


def test_train_refuses_a_folder_without_manifest(tmp_path, capsys):
    from pathlib import Path

    from evav.cli import main

    repo = Path(__file__).resolve().parents[1]
    rc = main(["train", str(repo / "configs/debug.yaml"), f"data.train=[{tmp_path}]"])
    assert rc == 2 and "has no manifest.json" in capsys.readouterr().err
