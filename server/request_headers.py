"""A request's own scheduling asks, from its headers: x-slo-ms, x-priority, x-request-timeout-ms (README,
Scheduling and Overload). Each refuses a value it cannot take with InvalidRequest, in the route's error shape."""

from __future__ import annotations

from collections.abc import Mapping

from server.errors import InvalidRequest

PRIORITY_NAMES = {"low": -1, "normal": 0, "high": 1}


def scheduling(headers: Mapping[str, str], default_slo_ms: float) -> tuple[float, int]:
    """(SLO seconds, priority) from the x-slo-ms and x-priority headers, else the server's SLO and priority 0."""
    slo_ms = default_slo_ms
    raw = headers.get("x-slo-ms")
    if raw is not None:
        try:
            slo_ms = float(raw)
        except ValueError:
            slo_ms = -1.0
        if not 0 < slo_ms <= 86_400_000:
            raise InvalidRequest(f"x-slo-ms must be a number of milliseconds in (0, 86400000], got {raw!r}")
    priority = 0
    raw = headers.get("x-priority")
    if raw is not None:
        try:
            priority = PRIORITY_NAMES[raw.lower()] if raw.lower() in PRIORITY_NAMES else int(raw)
        except ValueError:
            priority = 99
        if not -10 <= priority <= 10:
            raise InvalidRequest(f"x-priority must be low, normal, high or an integer in [-10, 10], got {raw!r}")
    return slo_ms / 1000, priority


def request_timeout(headers: Mapping[str, str], limit_s: float) -> float:
    """Seconds the request may take in all (from arrival): x-request-timeout-ms, capped at `limit_s`
    (server.request_timeout_s), which is also the default."""
    raw = headers.get("x-request-timeout-ms")
    if raw is None:
        return limit_s
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not ms > 0:  # also refuses NaN
        raise InvalidRequest(f"x-request-timeout-ms must be a positive number of milliseconds, got {raw!r}")
    return min(ms / 1000, limit_s)
