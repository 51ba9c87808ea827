"""The edge agent's Prometheus counters add up what a generation's stats say: drafts, acceptance, cloud rounds,
the drafter's prefill and every fault the client rode out, as a scrape of `/metrics` shows them."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from wisp_edge.agent import EdgeMetrics
from wisp_edge.engine import GenerationStats, RoundStats


def _scrape(metrics: EdgeMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_generation_is_counted_with_its_cloud_rounds_and_faults():
    metrics = EdgeMetrics()
    cloud = RoundStats(0, 0, 0.0, 0.0, 80.0, 60.0, 1.0)
    drafted = RoundStats(4, 2, 40.0, 15.0, 90.0, 70.0, 2.0)
    stats = GenerationStats(rounds=[cloud, cloud, drafted], drafter_prefill_ms=250.0, cloud_rounds=2,
                            ahead_ready=1, ahead_wasted_ms=12.0, faults={"retries": 3, "resumes": 1, "replayed_rounds": 2, "busy_waits": 0})
    metrics.record(stats)
    metrics.record(GenerationStats(rounds=[drafted], faults={"retries": 1}))
    got = _scrape(metrics)
    assert got[("wisp_edge_drafts_total", ())] == 4
    assert got[("wisp_edge_draft_tokens_total", ())] == 8 and got[("wisp_edge_accepted_tokens_total", ())] == 4
    assert got[("wisp_edge_cloud_rounds_total", ())] == 2
    assert got[("wisp_edge_drafter_prefill_seconds_count", ())] == 1
    assert got[("wisp_edge_drafter_prefill_seconds_sum", ())] == 0.25
    assert got[("wisp_edge_faults_total", (("kind", "retries"),))] == 4
    assert got[("wisp_edge_faults_total", (("kind", "replayed_rounds"),))] == 2
    assert got[("wisp_edge_faults_total", (("kind", "resumes"),))] == 1
    assert ("wisp_edge_faults_total", (("kind", "busy_waits"),)) not in got  # nothing happened, no series
    assert got[("wisp_edge_ahead_ready_rounds_total", ())] == 1
    assert got[("wisp_edge_ahead_wasted_drafting_seconds_total", ())] == 0.012
    assert got[("wisp_edge_wasted_drafting_seconds_total", ())] == 0.03
