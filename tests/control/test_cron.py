"""Five-field cron expressions: what matches, what is refused and the field it names."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from phloem.control.cron import CronError, parse_cron


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
       second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


@pytest.mark.parametrize(("expr", "after", "expected"), [
    ("* * * * *", at(2026, 12, 1, 9, 7, 30), at(2026, 12, 1, 9, 8)),
    ("*/15 9-17 * * mon-fri", at(2026, 12, 1, 9, 7), at(2026, 12, 1, 9, 15)),
    ("*/15 9-17 * * mon-fri", at(2026, 12, 4, 17, 45), at(2026, 12, 7, 9, 0)),  # Fri -> Mon
    ("0 3 * * *", at(2026, 12, 31, 3, 0), at(2027, 1, 1, 3, 0)),
    ("0 0 29 feb *", at(2026, 3, 1, 0, 0), at(2028, 2, 29, 0, 0)),
    ("30 12 1 jan,jul *", at(2026, 1, 1, 12, 30), at(2026, 7, 1, 12, 30)),
    ("0 0 * * 7", at(2026, 12, 1, 0, 0), at(2026, 12, 6, 0, 0)),  # 7 is Sunday
    # Both day fields restricted: either matches (the 13th, or a Friday).
    ("0 0 13 * fri", at(2026, 12, 1, 0, 0), at(2026, 12, 4, 0, 0)),
    ("5,10-12/2 * * * *", at(2026, 12, 1, 9, 10), at(2026, 12, 1, 9, 12)),
    # A day field starting with '*' (a step) does not widen the other: Mondays only.
    ("0 0 */2 * mon", at(2026, 12, 1, 0, 0), at(2026, 12, 7, 0, 0)),
])
def test_next_after(expr: str, after: datetime, expected: datetime) -> None:
    assert parse_cron(expr).next_after(after) == expected


@pytest.mark.parametrize(("expr", "says"), [
    ("* * * *", "must have 5 fields"),
    ("* * * * * *", "must have 5 fields"),
    ("60 * * * *", "minute: 60 is out of range 0-59"),
    ("* 24 * * *", "hour: 24 is out of range 0-23"),
    ("* * 0 * *", "day of month: 0 is out of range 1-31"),
    ("* * * foo *", "month: 'foo' is not a number or a name"),
    ("*/0 * * * *", "minute: step '0' must be a positive number"),
    ("5-1 * * * *", "minute: range '5-1' runs backwards"),
    ("@hourly", "must have 5 fields"),
    ("0 0 31 feb *", "never matches"),
])
def test_refused_naming_the_field(expr: str, says: str) -> None:
    with pytest.raises(CronError, match=says):
        parse_cron(expr).next_after(at(2026, 12, 1, 0, 0))
