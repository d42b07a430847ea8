"""Prometheus metrics of the scheduler, served over HTTP at /metrics.

The vllm:* names are the ones routers and autoscalers already read from vLLM
(llm-d's inference scheduler, vLLM production-stack, KEDA recipes): gauges of
running and waiting requests and KV-cache usage, token counters, time to first
token, inter-token latency and end-to-end latency histograms, preemptions and
prefix-cache queries and hits. They carry a model_name label, as vLLM's do.
The llmexec:* ones are ours: per-runner state for data parallelism, step
timing, KV slots allocated and empty (the KV waste share), Redis write time.

Gauges are read from the engine when Prometheus scrapes (a collector), so they
are never stale; counters and histograms are updated as things happen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

# vLLM's buckets, so dashboards built for vLLM read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EngineMetrics:
    """The metrics; `snapshot` is called at scrape time and returns the engine's state:
    {"running", "waiting", "runners": [{"address", "healthy", "num_blocks", "used_blocks",
    "running", "waiting", "routed", "hits", "queries", "preemptions", "recoveries"}]}."""

    def __init__(self, model_name: str, snapshot: Callable[[], dict]):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels, values = ["model_name"], [model_name]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of admitted requests.", labels,
                                     registry=self.registry).labels(*values)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", labels,
                                         registry=self.registry).labels(*values)
        self.request_success = Counter("vllm:request_success", "Finished completions, by finish reason.",
                                       labels + ["finished_reason"], registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to first token of a completion.", labels,
                              buckets=TTFT_BUCKETS, registry=self.registry).labels(*values)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between two tokens of a completion.", labels,
                             buckets=ITL_BUCKETS, registry=self.registry).labels(*values)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token of a completion.", labels,
                             buckets=E2E_BUCKETS, registry=self.registry).labels(*values)
        self.step_seconds = Histogram("llmexec:step_duration_seconds", "One scheduled step, runner call included.",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.step_tokens = Histogram("llmexec:step_batch_tokens", "Tokens in one step's flattened batch.",
                                     buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384), registry=self.registry)
        self.steps_ahead = Counter("llmexec:steps_planned_ahead",
                                   "Decode steps planned and sent while the step before them ran (async scheduling).",
                                   registry=self.registry)
        self.store_seconds = Histogram("llmexec:state_store_write_seconds", "One step's Redis pipeline.",
                                       buckets=STEP_BUCKETS, registry=self.registry)
        self.kv_slots_allocated = Counter(
            "llmexec:kv_slots_allocated", "Sum over steps of the KV slots in held blocks.", registry=self.registry)
        self.kv_slots_empty = Counter(
            "llmexec:kv_slots_empty", "Sum over steps of the held KV slots that hold no token (waste).",
            registry=self.registry)
        self.resumed = Counter("llmexec:resumed_streams", "ResumeGenerate calls answered.", registry=self.registry)
        self.recovered = Counter("llmexec:recovered_sequences",
                                 "Unfinished sequences reloaded from Redis at start-up.", registry=self.registry)
        self.registry.register(_EngineCollector(model_name, snapshot))
        self._server = None
        self.port = 0

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics on port (0: a free one); returns the port."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _EngineCollector:
    def __init__(self, model_name: str, snapshot: Callable[[], dict]):
        self.model_name = model_name
        self.snapshot = snapshot

    def describe(self):
        return []  # collected at scrape time only; nothing to check at registration

    def collect(self):
        state = self.snapshot()
        runners = state["runners"]
        model = [self.model_name]

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(model, value)
            return g

        yield gauge("vllm:num_requests_running", "Sequences in the running batch.", state["running"])
        yield gauge("vllm:num_requests_waiting", "Sequences waiting to be scheduled.", state["waiting"])
        total_blocks = sum(r["num_blocks"] for r in runners) or 1
        yield gauge("vllm:kv_cache_usage_perc", "Share of KV-cache blocks in use, 0 to 1.",
                    sum(r["used_blocks"] for r in runners) / total_blocks)
        for name, key, doc in (
            ("vllm:prefix_cache_queries", "queries", "Prompt tokens looked up in the prefix cache."),
            ("vllm:prefix_cache_hits", "hits", "Prompt tokens found in the prefix cache."),
            ("vllm:num_preemptions", "preemptions", "Sequences preempted (recomputed later)."),
        ):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(model, sum(r[key] for r in runners))
            yield c
        per_runner = {
            "llmexec:runner_healthy": ("Whether the runner answers (1) or is being waited for (0).", "healthy"),
            "llmexec:runner_kv_blocks_used": ("KV blocks held on this runner.", "used_blocks"),
            "llmexec:runner_kv_blocks": ("KV blocks of this runner.", "num_blocks"),
            "llmexec:runner_requests_running": ("Sequences running on this runner.", "running"),
            "llmexec:runner_requests_waiting": ("Sequences waiting for this runner.", "waiting"),
        }
        for name, (doc, key) in per_runner.items():
            g = GaugeMetricFamily(name, doc, labels=["runner"])
            for r in runners:
                g.add_metric([r["address"]], float(r[key]))
            yield g
        for name, key, doc in (
            ("llmexec:runner_routed_sequences", "routed", "Sequences routed to this runner."),
            ("llmexec:runner_prefix_cache_hits", "hits", "Prompt tokens found in this runner's prefix cache."),
            ("llmexec:runner_recoveries", "recoveries", "Times this runner was lost and its KV recomputed."),
        ):
            c = CounterMetricFamily(name, doc, labels=["runner"])
            for r in runners:
                c.add_metric([r["address"]], r[key])
            yield c
