"""The drafter's prefill counters as Prometheus counters, read from the drafter at each scrape.

`wisp_edge_drafter_prefill_tokens_total` counts tokens evaluated by prompt prefills and
`wisp_edge_drafter_prefix_reused_tokens_total` the tokens whose cache a reset kept (a chat's
earlier turns); together they show how much prefill the prefix reuse saves.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily


class DrafterCounters:
    """A Prometheus collector over `drafter.counters` (a `PrefillCounters`); none for a drafter without."""

    def __init__(self, drafter) -> None:
        self.drafter = drafter

    def collect(self) -> Iterator[CounterMetricFamily]:
        counters = getattr(self.drafter, "counters", None)
        if counters is None:
            return
        yield CounterMetricFamily("wisp_edge_drafter_prefill_tokens", "Tokens the drafter evaluated in prompt "
                                  "prefills", value=counters.prefill_tokens)
        yield CounterMetricFamily("wisp_edge_drafter_prefix_reused_tokens", "Prompt tokens whose cache the "
                                  "drafter kept from earlier generations (not prefilled again)",
                                  value=counters.prefix_reused_tokens)
