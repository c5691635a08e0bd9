"""Five-field cron expressions (minute hour day-of-month month day-of-week), in UTC.

The classic (Vixie) rules: ``*``, numbers, ranges ``a-b``, steps ``*/n`` and ``a-b/n``,
lists ``a,b``, month and weekday names (``jan``, ``mon``), weekday 0 or 7 for Sunday;
when both day fields are restricted a day matching either runs. No seconds field, no
``@hourly`` macros, no ``L``/``W``/``#``: a schedule fires at most once a minute.

    cron = parse_cron("*/15 9-17 * * mon-fri")
    cron.next_after(datetime(2026, 12, 1, 9, 7, tzinfo=UTC))  # 09:15 UTC
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_MONTHS = {n: i for i, n in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
    start=1)}
_DAYS = {n: i for i, n in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
#: (name, low, high, names) of each field, in order.
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _DAYS))
#: How far ahead a schedule is searched (Feb 29 on a Monday recurs within 28 years).
_HORIZON_DAYS = 366 * 29


class CronError(ValueError):
    """Says which field of the expression is wrong and the rule."""


@dataclass(frozen=True)
class Cron:
    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_any: bool
    weekdays_any: bool

    def matches_day(self, day: datetime) -> bool:
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_any or self.weekdays_any:
            return dom and dow
        return dom or dow

    def next_after(self, after: datetime) -> datetime:
        """The first matching minute strictly after ``after`` (an aware datetime), UTC."""
        start = after.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = start.replace(hour=0, minute=0)
        for _ in range(_HORIZON_DAYS):
            if day.month in self.months and self.matches_day(day):
                for h in sorted(self.hours):
                    for m in sorted(self.minutes):
                        t = day.replace(hour=h, minute=m)
                        if t >= start:
                            return t
            day += timedelta(days=1)
        raise CronError(f"{self.expression!r} never matches a date")


def _field(text: str, name: str, low: int, high: int, names: dict[str, int]) -> set[int]:
    def value(token: str) -> int:
        token = token.lower()
        if token in names:
            return names[token]
        if not token.isdigit():
            raise CronError(f"{name}: {token!r} is not a number"
                            + (f" or a name ({', '.join(names)})" if names else ""))
        v = int(token)
        if not low <= v <= high:
            raise CronError(f"{name}: {v} is out of range {low}-{high}")
        return v

    out: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{name}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if base == "*":
            first, last = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = value(a), value(b)
            if first > last:
                raise CronError(f"{name}: range {base!r} runs backwards")
        elif base:
            first = value(base)
            last = high if step_text else first
        else:
            raise CronError(f"{name}: empty value in {text!r}")
        out.update(range(first, last + 1, step))
    return out


def parse_cron(expression: str) -> Cron:
    """Parse a five-field expression, or raise :class:`CronError` naming the field."""
    if not isinstance(expression, str):
        raise CronError("must be a string of five fields")
    parts = expression.split()
    if len(parts) != 5:
        raise CronError(f"must have 5 fields (minute hour day-of-month month "
                        f"day-of-week, UTC), got {len(parts)} in {expression!r}")
    values = [_field(text, name, low, high, names)
              for text, (name, low, high, names) in zip(parts, _FIELDS, strict=True)]
    weekdays = {d % 7 for d in values[4]}
    return Cron(expression=" ".join(parts), minutes=frozenset(values[0]),
                hours=frozenset(values[1]), days=frozenset(values[2]),
                months=frozenset(values[3]), weekdays=frozenset(weekdays),
                # Vixie's rule: a day field starting with '*' does not restrict the other.
                days_any=parts[2].startswith("*"), weekdays_any=parts[4].startswith("*"))
