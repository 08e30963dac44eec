"""laiontools.core.failpoints: the pause a kill test asks for, nothing when unset, a clear error when malformed."""

from __future__ import annotations

import time

import pytest

from laiontools.core import failpoints


def test_unset_or_other_name_does_not_pause(monkeypatch):
    monkeypatch.delenv(failpoints.ENV, raising=False)
    assert failpoints.pause("train.final-write") == 0.0
    monkeypatch.setenv(failpoints.ENV, "reshard.before-manifest=3")
    assert failpoints.pause("train.final-write") == 0.0  # not the 3 s asked of the other point


def test_named_point_pauses_for_the_given_seconds(monkeypatch):
    monkeypatch.setenv(failpoints.ENV, "a=0, train.final-write=0.2")
    t0 = time.monotonic()
    assert failpoints.pause("train.final-write") == 0.2
    assert time.monotonic() - t0 >= 0.2


@pytest.mark.parametrize("spec", ["train.final-write", "x=abc", "=1", "x=-1", "x=nan", "x=inf", "x=1e999"])
def test_malformed_spec_names_the_entry(monkeypatch, spec):
    monkeypatch.setenv(failpoints.ENV, spec)
    with pytest.raises(ValueError, match=failpoints.ENV):
        failpoints.pause("x")


def test_spaces_around_the_equals_sign_still_name_the_point(monkeypatch):
    # "name = 5" was read as the point "name " (with its space): no call site has that name, so the pause a
    # kill test asked for never happened, and the test killed by luck of the scheduler again
    monkeypatch.setenv(failpoints.ENV, "a=0, train.final-write = 0.2")
    t0 = time.monotonic()
    assert failpoints.pause("train.final-write") == 0.2
    assert time.monotonic() - t0 >= 0.2
