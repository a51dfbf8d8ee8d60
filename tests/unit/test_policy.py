from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.policy import RolloutPolicy, Target, split_into_waves


@pytest.mark.parametrize(
    ("count", "waves", "expected"),
    [
        (200, ["1%", "10%", "100%"], [2, 18, 180]),
        (100, ["1%", "10%", "100%"], [1, 9, 90]),
        (3, ["1%", "10%", "100%"], [1, 1, 1]),
        (1, ["1%", "10%", "100%"], [1]),
        (10, [2, 3], [2, 8]),
        (10, ["50%"], [10]),
        (0, ["1%", "100%"], []),
        (10_000, ["1%", "10%", "100%"], [100, 900, 9000]),
    ],
)
def test_split_into_waves(count: int, waves: list[str | int], expected: list[int]) -> None:
    sizes = split_into_waves(count, waves)
    assert sizes == expected
    assert sum(sizes) == count


@pytest.mark.parametrize("bad", [["0%"], ["150%"], ["ten"], [0], []])
def test_bad_wave_specs_are_rejected_with_the_field(bad: list[str | int]) -> None:
    with pytest.raises(ValidationError) as info:
        RolloutPolicy(waves=bad)
    assert info.value.errors()[0]["loc"][0] == "waves"


def test_backoff_doubles() -> None:
    policy = RolloutPolicy(retry_backoff_s=2)
    assert [policy.backoff(a) for a in (1, 2, 3)] == [2, 4, 8]


def test_target_needs_ids_or_model() -> None:
    with pytest.raises(ValidationError):
        Target()
    assert Target(model="m").labels == {}
