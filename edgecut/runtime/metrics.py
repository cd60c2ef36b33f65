"""Prometheus metrics of an edge server (single-process or tier), on `--metrics-port`.

edgecut_requests_total{model,plan}          infer requests answered (results and errors)
edgecut_errors_total{model,code}            error replies, by protocol error code
edgecut_queue{model}                        requests admitted and not yet answered, now
edgecut_batch_size{model}                   requests per replica call (1: the latency path)
edgecut_latency_seconds{model,plan}         receipt of the request to its reply, results only
edgecut_edge_seconds{model,plan}            compute of the edge part, results only
edgecut_connections_total                   device connections accepted

Each server has its own registry (two servers in one process do not mix). `prometheus-client` is
imported only when metrics are asked for.
"""
from __future__ import annotations

from edgecut.errors import UsageError

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self):
        try:
            import prometheus_client as pc
        except ImportError:
            raise UsageError("--metrics-port needs prometheus-client: pip install 'edgecut[tier]'") from None
        self._pc = pc
        self.registry = r = pc.CollectorRegistry()
        self.requests = pc.Counter("edgecut_requests", "infer requests answered", ["model", "plan"], registry=r)
        self.errors = pc.Counter("edgecut_errors", "error replies by code", ["model", "code"], registry=r)
        self.queue = pc.Gauge("edgecut_queue", "requests admitted, not yet answered", ["model"], registry=r)
        self.batch = pc.Histogram("edgecut_batch_size", "requests per replica call", ["model"],
                                  buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.latency = pc.Histogram("edgecut_latency_seconds", "request received to reply ready",
                                    ["model", "plan"], buckets=_BUCKETS, registry=r)
        self.edge = pc.Histogram("edgecut_edge_seconds", "edge part compute", ["model", "plan"],
                                 buckets=_BUCKETS, registry=r)
        self.connections = pc.Counter("edgecut_connections", "device connections accepted", registry=r)
        self._http = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics on host:port (0: any free port); the port bound."""
        self._http, _ = self._pc.start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def answered(self, model: str, plan, reply: dict, seconds: float) -> None:
        """One infer request's reply, `seconds` after it was received."""
        plan = plan if isinstance(plan, str) else "?"
        self.requests.labels(model, plan).inc()
        if reply["type"] == "error":
            self.errors.labels(model, reply["error"]["code"]).inc()
            return
        self.latency.labels(model, plan).observe(seconds)
        self.edge.labels(model, plan).observe(reply.get("edge_s", 0.0))

    def text(self) -> str:
        return self._pc.generate_latest(self.registry).decode()
