"""FHIR date, dateTime and instant values as UTC ranges.

Contract: :func:`date_range` maps a FHIR date-ish string to the closed range ``[low, high]`` of
instants it covers (``2024`` → all of 2024, ``2024-03-05T10:00:00+02:00`` → that second), both
timezone-aware UTC; values without a zone are read as UTC. It returns ``None`` for text that is
not such a value. Used by indexing and by search-value parsing alike, so both agree.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)

_ONE_US = timedelta(microseconds=1)


def _add_months(dt: datetime, months: int) -> datetime:
    total = dt.month - 1 + months
    return dt.replace(year=dt.year + total // 12, month=total % 12 + 1)


def date_range(value: str) -> tuple[datetime, datetime] | None:
    """The UTC range covered by ``value``, or ``None`` if it is not a FHIR date/dateTime/instant."""
    m = _RE.match(value)
    if m is None:
        return None
    try:
        year = int(m["y"])
        if m["m"] is None:
            low = datetime(year, 1, 1, tzinfo=UTC)
            return low, _end(low.replace(year=year + 1) if year < 9999 else None)
        month = int(m["m"])
        if m["d"] is None:
            low = datetime(year, month, 1, tzinfo=UTC)
            return low, _end(_add_months(low, 1) if (year, month) < (9999, 12) else None)
        day = int(m["d"])
        if m["H"] is None:
            low = datetime(year, month, day, tzinfo=UTC)
            return low, _end(low + timedelta(days=1) if low.date() < datetime.max.date() else None)
        tz = UTC
        if m["tz"] and m["tz"] != "Z":
            sign = 1 if m["tz"][0] == "+" else -1
            hours, minutes = int(m["tz"][1:3]), int(m["tz"][4:6])
            if hours > 14 or minutes > 59:
                return None

            tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
        frac = m["f"] or ""
        local = datetime(
            year, month, day, int(m["H"]), int(m["M"]), int(m["S"] or 0), int((frac + "000000")[:6]), tzinfo=tz
        )
        low = local.astimezone(UTC)
        if m["S"] is None:
            return low, low + timedelta(minutes=1) - _ONE_US
        if not frac:
            return low, low + timedelta(seconds=1) - _ONE_US
        return low, low
    except (ValueError, OverflowError):
        return None


def _end(next_start: datetime | None) -> datetime:
    if next_start is None:
        return datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    return next_start - _ONE_US


def as_utc(value: datetime) -> datetime:
    """Databases without zone support hand back naive UTC datetimes; make them aware."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def instant(value: datetime) -> str:
    """FHIR ``instant`` text for ``value`` (UTC, millisecond precision, ``Z``)."""
    value = as_utc(value)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def http_date(value: datetime) -> str:
    """RFC 7231 HTTP-date for ``Last-Modified``."""
    return as_utc(value).strftime("%a, %d %b %Y %H:%M:%S GMT")
