"""Prometheus text exposition (format 0.0.4) for the server, without a client library.

Counters of requests by route and status, latency histograms by route, error counts, encoder
batches, and a gauge of vectors per index. Routes are labelled by their template
(`/v1/indexes/{name}/items/{item_id}`), never by the raw path, so label sets stay bounded.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        self._hist: dict[str, list[int]] = {}
        self._sum: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1
            if status >= 500:
                self.errors[(route, "server")] += 1
            elif status >= 400:
                self.errors[(route, "client")] += 1
            counts = self._hist.setdefault(route, [0] * len(BUCKETS))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            self._sum[route] += seconds
            self._count[route] += 1

    def render(self, gauges: dict[str, tuple[str, Mapping[Any, float]]]) -> str:
        """The exposition text; `gauges` maps name -> (help, {labels: value}) computed by the caller."""
        lines = [
            "# HELP retriever_requests_total HTTP requests by method, route and status.",
            "# TYPE retriever_requests_total counter",
        ]
        with self._lock:
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f"retriever_requests_total{_labels(method=method, route=route, status=str(status))} {n}")
            lines += [
                "# HELP retriever_errors_total Responses with status >= 400, by route and kind (client, server).",
                "# TYPE retriever_errors_total counter",
            ]
            for (route, kind), n in sorted(self.errors.items()):
                lines.append(f"retriever_errors_total{_labels(route=route, kind=kind)} {n}")
            lines += [
                "# HELP retriever_request_seconds Request latency by route.",
                "# TYPE retriever_request_seconds histogram",
            ]
            for route, counts in sorted(self._hist.items()):
                for bound, n in zip(BUCKETS, counts):
                    lines.append(f"retriever_request_seconds_bucket{_labels(route=route, le=repr(bound))} {n}")
                lines.append(f"retriever_request_seconds_bucket{_labels(route=route, le='+Inf')} {self._count[route]}")
                lines.append(f"retriever_request_seconds_sum{_labels(route=route)} {self._sum[route]:.6f}")
                lines.append(f"retriever_request_seconds_count{_labels(route=route)} {self._count[route]}")
        for name, (help_text, values) in gauges.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for labels, value in sorted(values.items()):
                lines.append(f"{name}{_labels(**dict(labels))} {value:g}")
        return "\n".join(lines) + "\n"


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
