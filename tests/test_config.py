from __future__ import annotations

import dataclasses

import pytest

from lowrank_compile import OPTION_DOCS
from lowrank_compile import LowRankConfig
from lowrank_compile import LowRankOptionError
from lowrank_compile import parse_options


def test_defaults_and_documented_names_agree():
    fields = [f.name for f in dataclasses.fields(LowRankConfig)]
    assert fields == list(OPTION_DOCS)
    cfg = parse_options(None)
    assert cfg == LowRankConfig() == parse_options({})


def test_values_are_normalised():
    cfg = parse_options(
        {"rank": 0.25, "include": "*.q_proj.*", "exclude": ["a*", "b*"], "inductor": {"max_autotune": False}}
    )
    assert cfg.include == ("*.q_proj.*",) and cfg.exclude == ("a*", "b*")
    assert cfg.inductor_patches() == {"max_autotune": False}
    assert parse_options(cfg.as_dict()) == cfg
    assert hash(cfg) == hash(parse_options(cfg.as_dict()))  # usable as a cache key


@pytest.mark.parametrize(
    "shape, rank, expected", [((64, 32), 0.25, 8), ((32, 64), 0.25, 8), ((10, 3), 0.1, 1), ((64, 32), 16, 16)]
)
def test_resolved_rank(shape, rank, expected):
    assert LowRankConfig(rank=rank).resolved_rank(shape) == expected


def test_rank_none_resolves_to_none():
    assert LowRankConfig(rank=None).resolved_rank((64, 64)) is None


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LowRankConfig().rank = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad",
    [
        {"state_bits": 16},
        {"rank": 0},
        {"rank": 0.0},
        {"scale": -1.0},
        {"inductor": 3},
        {"exclude": ""},
        {"update_kernel": "triton"},
    ],
)
def test_bad_values(bad):
    with pytest.raises(LowRankOptionError) as info:
        parse_options(bad)
    (name,) = bad
    assert repr(name) in str(info.value)
    if name == "update_kernel":  # the accepted values are named
        assert "auto | inductor" in str(info.value)


def test_non_mapping_options():
    with pytest.raises(LowRankOptionError, match="must be a dict"):
        parse_options([("rank", 3)])  # type: ignore[arg-type]
