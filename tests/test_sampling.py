"""Scheduler selection by name: every short name resolves, bad or unusable ones fail in one line."""

from __future__ import annotations

import pytest

from ip2p.errors import Ip2pError
from ip2p.sampling.loop import SCHEDULERS, make_scheduler, scheduler_class


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_short_name_makes_a_scheduler_with_the_checkpoint_schedule(name, tiny_editor):
    scheduler = make_scheduler(name, tiny_editor.scheduler.config)
    assert type(scheduler).__name__ == SCHEDULERS[name]
    assert scheduler.config.beta_start == tiny_editor.scheduler.config.beta_start
    assert scheduler.config.beta_schedule == tiny_editor.scheduler.config.beta_schedule


def test_unknown_scheduler_is_one_line():
    with pytest.raises(Ip2pError, match="unknown scheduler 'foo'"):
        scheduler_class("foo")
    with pytest.raises(Ip2pError, match="unknown scheduler"):
        scheduler_class("UNet2DConditionModel")  # a diffusers class, but not a scheduler


def test_sde_sampler_that_ignores_our_seed_is_refused():
    import diffusers

    cls = diffusers.DPMSolverSDEScheduler
    expected = "needs a package" if type(cls).__name__ == "DummyObject" else "outside the seeded generator"
    with pytest.raises(Ip2pError, match=expected):
        scheduler_class("DPMSolverSDEScheduler")
