"""The pipeline's sections contain the library configs instead of copying their fields: every field of every
library config a section wraps is settable from YAML (flat, next to the section's own keys), reaches the library
config the stage builds, and an unknown key fails at load time naming the known ones."""

from __future__ import annotations

import dataclasses

import pytest

from edgeguard.errors import BadInput
from edgeguard.pipeline import PipelineConfig
from edgeguard.pipeline.config import LibrarySection


def _sections():
    import typing

    hints = typing.get_type_hints(PipelineConfig)
    return {name: t for name, t in hints.items() if isinstance(t, type) and issubclass(t, LibrarySection)}


def _other_value(f: dataclasses.Field):
    """A valid value of field ``f`` that differs from its default, for the types the library configs use."""
    d = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    table = {"mode": None, "calibration": "minmax", "target": "cpu", "renderer": None, "variant": None, "site": None}
    if f.name in table:
        return table[f.name]
    if isinstance(d, bool):
        return not d
    if isinstance(d, int):
        return d + 1
    if isinstance(d, float):
        return d * 0.5 if d else 0.5
    if isinstance(d, tuple) and d and all(isinstance(v, int) for v in d):
        return tuple(v + 1 for v in d)
    return None


def _build(section: str, sec, lib):
    """The library config the stage builds from section ``sec``."""
    if section == "quantize":
        return sec.to_quantize_config(0)
    if section == "export":
        return sec.export_config()
    if section == "bench":
        return sec.library_config(lib, 0)
    return getattr(sec, f"to_{section}_config")(0)


def test_every_library_field_is_reachable_from_yaml():
    sections = _sections()
    assert set(sections) >= {"watermark", "magicguard", "fragile", "quantize", "export", "bench"}
    checked = 0
    for section, cls in sections.items():
        for name, lib in cls.library_fields().items():
            f = next(f for f in dataclasses.fields(lib) if f.name == name)
            value = _other_value(f)
            if value is None:
                continue  # a choice or path with no safe alternative here; loading its default is checked below
            extra = {"mode": "qat"} if section == "quantize" and lib.__name__ == "QatConfig" else {}
            cfg = PipelineConfig.from_mapping({section: {name: value, **extra}})
            sec = getattr(cfg, section)
            assert getattr(sec, name) == value, (section, name)
            built = _build(section, sec, lib)
            target = built.base if section == "quantize" and lib.__name__ == "PtqConfig" and extra else built
            assert getattr(target, name) == value, (section, name, target)
            checked += 1
        for name in cls.library_fields():  # every field, at its default, loads
            lib = cls.library_fields()[name]
            f = next(f for f in dataclasses.fields(lib) if f.name == name)
            d = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            PipelineConfig.from_mapping({section: {name: list(d) if isinstance(d, tuple) else d}})
    assert checked >= 30, checked


def test_fields_the_copies_used_to_drop_are_settable():
    cfg = PipelineConfig.from_mapping({"watermark": {"stop_after": 5, "renderer": "center_crop"},
                                       "fragile": {"lr": 0.02, "uint8": True}, "bench": {"rounds": 4}})
    assert cfg.watermark.to_watermark_config(0).stop_after == 5
    assert cfg.fragile.to_fragile_config(3).lr == 0.02 and cfg.fragile.to_fragile_config(3).seed == 3
    assert cfg.bench.rounds == 4 and cfg.bench.warmup == 3  # the pipeline's own default where it differs


@pytest.mark.parametrize("section, bad, words", [
    ("watermark", {"n_trigers": 10}, "unknown setting 'n_trigers'"),
    ("fragile", {"seed": 3}, "set the run's seed once"),
    ("quantize", {"target": "gpu"}, "target"),
    ("export", {"opset": 5}, "opset"),
])
def test_bad_keys_fail_at_load_time(section, bad, words):
    with pytest.raises(BadInput, match=words):
        PipelineConfig.from_mapping({section: bad})


def test_the_report_config_round_trips():
    from edgeguard.config import config_from_dict

    cfg = PipelineConfig.load("configs/demo.yaml")
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.watermark.alpha == 1e-3 and again.quantize.target == "cpu"
