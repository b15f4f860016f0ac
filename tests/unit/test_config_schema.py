"""The config side of a run: ``${seed}`` interpolation, the typed run options, the
argument checks, and estimator/method names from the packaged config groups."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sdze_lightning.checks import boolean, integer, non_negative_int, positive_int
from sdze_lightning.config_options import option_names
from sdze_lightning.config_schema import check_run_options
from sdze_lightning.estimators import ESTIMATORS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def seeds(*overrides: str) -> tuple[int, int, int]:
    with initialize_config_module("sdze_lightning.configs", version_base="1.3"):
        cfg = compose("config", overrides=["method=sdze", *overrides])
    return cfg.pde.seed, cfg.model.seed, cfg.method.seed


def test_seed_reaches_every_group_and_an_explicit_group_seed_wins():
    assert seeds() == (0, 0, 0)
    assert seeds("seed=1") == (1, 1, 1)
    assert seeds("seed=1", "model.seed=3") == (1, 3, 1)
    assert seeds("seed=1", "pde.seed=5", "pde=hjb_lqg") == (5, 1, 1)


@pytest.mark.parametrize(("given", "message"), [
    ({"seed": "abc"}, "seed must be an integer, got 'abc'."),
    ({"seed": 1.5}, "seed must be an integer, got 1.5."),
    ({"divergence": "maybe"}, "divergence must be one of ['stop', 'skip'], got 'maybe'."),
    ({"replay_log": "maybe"}, "replay_log must be true or false, got 'maybe'."),
    ({"trainer": {"max_steps": "ten"}}, "trainer.max_steps must be an integer, got 'ten'."),
])
def test_run_options_give_one_line_typed_errors(given, message):
    with pytest.raises(ValueError) as info:
        check_run_options(OmegaConf.create(given))
    assert str(info.value) == message


def test_run_options_keep_their_keys_and_store_typed_values():
    cfg = OmegaConf.create({"seed": "3", "divergence": "skip",
                            "trainer": {"max_steps": -1, "max_epochs": None, "devices": 1}})
    check_run_options(cfg)
    assert OmegaConf.to_container(cfg) == {
        "seed": 3, "divergence": "skip", "trainer": {"max_steps": -1, "max_epochs": None,
                                                      "devices": 1}}


def test_checks_name_the_key_and_the_value():
    assert positive_int("pde.dim", 3) == 3 and non_negative_int("pde.n_eval", 0) == 0
    assert integer("seed", -2) == -2 and boolean("pde.prefetch", True) is True
    for check, value, message in [
        (lambda v: positive_int("model.width", v), 0, "model.width must be a positive integer"),
        (lambda v: positive_int("model.width", v), True, "model.width must be a positive integer"),
        (lambda v: non_negative_int("pde.n_eval", v), -1, "must be a non-negative integer"),
        (lambda v: integer("estimator.num_directions", v, 2), 1, "must be an integer >= 2"),
        (lambda v: boolean("pde.prefetch", v), "yes", "pde.prefetch must be true or false"),
    ]:
        with pytest.raises(ValueError, match=message):
            check(value)


def test_names_are_the_group_files_that_name_a_target():
    for group in ("estimator", "method"):
        files = {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")
                 if "_target_" in OmegaConf.load(p)}
        assert set(option_names(group)) == files
    assert set(ESTIMATORS) == set(option_names("estimator")) and "stein_he" not in ESTIMATORS
