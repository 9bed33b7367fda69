"""Prometheus metrics of the server (own CollectorRegistry), with vLLM's names under the `strata:` prefix so
dashboards written for vLLM need only the prefix changed."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class EngineMetrics:
    def __init__(self, model_name: str = ""):
        self.registry = r = CollectorRegistry()
        lbl = ["model_name"]
        self.model_name = model_name

        def g(name, doc):
            return Gauge(f"strata:{name}", doc, lbl, registry=r).labels(model_name)

        def c(name, doc):
            return Counter(f"strata:{name}", doc, lbl, registry=r).labels(model_name)

        def h(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(f"strata:{name}", doc, lbl, buckets=buckets, registry=r).labels(model_name)

        self.num_running = g("num_requests_running", "Requests with sequences in the running batch")
        self.num_waiting = g("num_requests_waiting", "Requests waiting to be scheduled (the bounded queue)")
        self.kv_usage = g("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)")
        self.kv_blocks_used = g("kv_cache_blocks_used", "KV-cache blocks in use")
        self.kv_blocks_total = g("kv_cache_blocks_total", "KV-cache blocks in the pool")
        self.prefix_hit_rate = g("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up")
        self.prefix_queries = c("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = c("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.num_preemptions = c("num_preemptions", "Sequences preempted (recomputed later)")
        self.prompt_tokens = c("prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = c("generation_tokens", "Tokens generated")
        self.ttft = h("time_to_first_token_seconds", "Time from arrival to the first generated token")
        self.itl = h("inter_token_latency_seconds", "Time between consecutive outputs of a request", ITL_BUCKETS)
        self.e2e = h("e2e_request_latency_seconds", "Time from arrival to the last token")
        self.queue_time = h("request_queue_time_seconds", "Time from arrival to first scheduling")
        self._success = Counter("strata:request_success", "Finished sequences by finish reason",
                                ["model_name", "finished_reason"], registry=r)
        # Tiered experts (published when the engine runs with a memory budget below the model)
        self.expert_hit_rate = g("expert_cache_hit_rate", "Expert lookups served from RAM / all lookups")
        self.expert_disk_bytes = c("expert_disk_read_bytes", "Bytes of expert weights read from disk")
        self.expert_disk_seconds = c("expert_disk_read_seconds",
                                     "Time the expert reads took (bytes / seconds: the disk rate the engine sees)")
        # Speculative decoding (vLLM's spec_decode counters; zero without --speculative-config)
        self.spec_drafts = c("spec_decode_num_drafts", "Verifications of drafted tokens (one per sequence and step)")
        self.spec_draft_tokens = c("spec_decode_num_draft_tokens", "Tokens drafted and verified")
        self.spec_accepted_tokens = c("spec_decode_num_accepted_tokens", "Drafted tokens the target accepted")
        self._last = {"queries": 0, "hits": 0, "preempt": 0, "disk": 0, "disk_s": 0.0, "drafts": 0,
                      "draft_tokens": 0, "accepted_tokens": 0}

    def finished(self, reason: str, num_seqs: int = 1) -> None:
        self._success.labels(self.model_name, reason).inc(num_seqs)

    def publish(self, stats: dict, num_running: int, num_waiting: int) -> None:
        """Called by the engine thread after every step with LLMEngine.get_stats(): gauges, and deltas of the
        engine's counters."""
        self.num_running.set(num_running)
        self.num_waiting.set(num_waiting)
        self.kv_usage.set(stats["kv_cache_usage"])
        self.kv_blocks_used.set(stats["num_blocks"] - stats["num_free_blocks"])
        self.kv_blocks_total.set(stats["num_blocks"])
        self._counter_delta(self.prefix_queries, "queries", stats["num_prefix_queries"])
        self._counter_delta(self.prefix_hits, "hits", stats["num_prefix_hits"])
        self._counter_delta(self.num_preemptions, "preempt", stats["num_preemptions"])
        if stats["num_prefix_queries"]:
            self.prefix_hit_rate.set(stats["num_prefix_hits"] / stats["num_prefix_queries"])
        spec = stats.get("spec_decode")
        if spec is not None:
            self._counter_delta(self.spec_drafts, "drafts", spec["num_drafts"])
            self._counter_delta(self.spec_draft_tokens, "draft_tokens", spec["num_draft_tokens"])
            self._counter_delta(self.spec_accepted_tokens, "accepted_tokens", spec["num_accepted_tokens"])
        tiers = stats.get("tiers")
        if tiers and tiers.get("tiered"):
            self.expert_hit_rate.set(tiers["expert_hit_rate"])
            self._counter_delta(self.expert_disk_bytes, "disk", tiers["disk_bytes_read"])
            self._counter_delta(self.expert_disk_seconds, "disk_s", tiers["disk_read_s"])

    def _counter_delta(self, counter, key: str, total: float) -> None:
        if total > self._last[key]:
            counter.inc(total - self._last[key])
        self._last[key] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
