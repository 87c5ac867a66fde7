"""The decode loop's Prometheus metrics, under the names operators know from vLLM.

``LoopMetrics`` is the loop's ``LoopObserver``. It takes the metrics module to build
them with (``bentoml.metrics`` in the service, which registers them with BentoML's
multiprocess registry; ``prometheus_client`` works too), so this package needs no
BentoML import.
"""

from __future__ import annotations

from types import ModuleType

# Latency buckets of vLLM's own histograms (seconds), cut to a chat service's range.
_FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
_TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class LoopMetrics:
    """Histograms, gauges and counters fed by the decode loop's thread."""

    def __init__(self, metrics: ModuleType, prefix: str = "chatbot_") -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return metrics.Histogram(name=prefix + name, documentation=doc, buckets=buckets)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first new token", _FIRST_TOKEN_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between a reply's tokens", _TOKEN_GAP_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival to admission into the loop", _REQUEST_BUCKETS
        )
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to the reply's end", _REQUEST_BUCKETS
        )
        self.rows_per_step = histogram(
            "rows_per_step", "Batch rows (replies x beams) in one decode step", _ROW_BUCKETS
        )
        gauge, counter = metrics.Gauge, metrics.Counter
        self.running = gauge(
            name=prefix + "num_requests_running", documentation="Replies in the loop"
        )
        self.waiting = gauge(name=prefix + "num_requests_waiting", documentation="Replies queued")
        self.prompt_tokens = counter(
            name=prefix + "prompt_tokens", documentation="Prompt tokens read"
        )
        self.generation_tokens = counter(
            name=prefix + "generation_tokens", documentation="Tokens generated"
        )
        self.ended_replies = counter(
            name=prefix + "request_success", labelnames=["finished_reason"],
            documentation="Replies that left the loop, by why: stop, length, "
            "abort (the client left, or stopped it) or error",
        )  # fmt: skip

    def admitted(self, queued_s: float, prompt_tokens: int) -> None:
        self.queue_time.observe(queued_s)
        self.prompt_tokens.inc(prompt_tokens)

    def step(self, rows: int, running: int, waiting: int) -> None:
        if rows:
            self.rows_per_step.observe(rows)
        self.running.set(running)
        self.waiting.set(waiting)

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)
        self.generation_tokens.inc()

    def next_token(self, gap_s: float) -> None:
        self.inter_token_latency.observe(gap_s)
        self.generation_tokens.inc()

    def finished(self, total_s: float) -> None:
        self.e2e_latency.observe(total_s)

    def ended(self, reason: str) -> None:
        self.ended_replies.labels(finished_reason=reason).inc()
