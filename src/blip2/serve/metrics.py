"""Prometheus text exposition for `GET /metrics`, written by hand: a few counters and histograms do not
justify a dependency, and the format is plain text (prometheus.io/docs/instrumenting/exposition_formats)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    escaped = (f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in pairs)
    return "{" + ",".join(escaped) + "}"


class _Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """Request counts by route and status, latency histograms by route, generation batch sizes; gauges
    (queue depth, cache) are read from callbacks when scraped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.batch_size = _Histogram(BATCH_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, str(status))] += 1
            self.latency.setdefault(route, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, size: int) -> None:
        with self._lock:
            self.batch_size.observe(size)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            lines += ["# HELP blip2_requests_total HTTP requests by route and status.",
                      "# TYPE blip2_requests_total counter"]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f"blip2_requests_total{_labels([('route', route), ('status', status)])} {n}")
            lines += ["# HELP blip2_request_latency_seconds Time from request to response, by route.",
                      "# TYPE blip2_request_latency_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                lines += self._histogram("blip2_request_latency_seconds", h, [("route", route)])
            lines += ["# HELP blip2_batch_size Requests per shared generation pass.",
                      "# TYPE blip2_batch_size histogram"]
            lines += self._histogram("blip2_batch_size", self.batch_size, [])
        for name, (help_text, read) in sorted(self.gauges.items()):
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {read():g}"]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _histogram(name: str, h: _Histogram, labels: list[tuple[str, str]]) -> list[str]:
        out = [f"{name}_bucket{_labels(labels + [('le', f'{b:g}')])} {c}" for b, c in zip(h.buckets, h.counts)]
        out.append(f"{name}_bucket{_labels(labels + [('le', '+Inf')])} {h.total}")
        out.append(f"{name}_sum{_labels(labels)} {h.sum:g}")
        out.append(f"{name}_count{_labels(labels)} {h.total}")
        return out
