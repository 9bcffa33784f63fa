"""Traffic shaping automation without sockets: rules as the files give them, triggers,
the durable store shared by workers, site-scoped suspensions, AIMD."""

from __future__ import annotations

from pathlib import Path

import pytest

from epoxi.delivery.automation import Aimd, _tenant_campaign
from epoxi.errors import ConfigError
from epoxi.message import MessageMeta
from epoxi.queue.model import Job, Message
from epoxi.queue.suspensions import Suspension, SuspensionRegistry
from epoxi.shaping.automation import Automated
from epoxi.shaping.files import AdaptiveRate, ShapingFiles, parse
from epoxi.shaping.throttle import Rate
from epoxi.store.automation import AutomationStore

RULES = """
[providers.yahoo]
match_mx_suffix = ["yahoodns.net"]
[[providers.yahoo.automation]]
regex = '\\[TS04\\]'
action = "suspend"
duration = "2h"
[[providers.yahoo.automation]]
regex = 'TS03'
action = "set_config"
name = "max_message_rate"
value = "100/h"
trigger = "5/h"
duration = "30m"
[domains."example.com"]
[[domains."example.com".automation]]
regex = 'blocked'
action = "bounce_campaign"
duration = "1d"
"""
YAHOO_SITE = "mta5.am0.yahoodns.net,mta6.am0.yahoodns.net"


def test_rules_parse_with_their_triggers_and_durations() -> None:
    parsed = parse(RULES)
    suspend, change = parsed.providers["yahoo"].automation
    assert (suspend.action, suspend.trigger.immediate, suspend.duration) == ("suspend", True, 7200)
    assert (change.trigger.count, change.trigger.period, str(change.trigger)) == (5, 3600, "5/h")
    assert change.change() == {"max_message_rate": "100/h"}
    assert suspend.pattern.search("421 4.7.0 [TS04] Messages from 192.0.2.1 deferred")


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ('regex = "(unclosed"\naction = "suspend"\nduration = "1h"', "not a valid regular"),
        ('regex = "x"\naction = "explode"\nduration = "1h"', "action"),
        ('regex = "x"\naction = "suspend"', "duration"),
        ('regex = "x"\naction = "suspend"\nduration = "1h"\ntrigger = "often"', "trigger"),
        ('regex = "x"\naction = "suspend"\nduration = "1h"\ntrigger = "2.5/h"', "whole matches"),
        ('regex = "x"\naction = "set_config"\nduration = "1h"', "set_config needs name"),
        (
            'regex = "x"\naction = "set_config"\nname = "connection_limit"\nvalue = 0\n'
            'duration = "1h"',
            "connection_limit",
        ),
        ('regex = "x"\naction = "suspend"\nname = "tls"\nvalue = 1\nduration = "1h"', "only"),
    ],
)
def test_a_bad_rule_is_refused_naming_what_is_wrong(rule: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f'[[domains."x.test".automation]]\n{rule}\n', "mine.toml")
    assert "mine.toml" in str(caught.value) and says in str(caught.value)


def test_rules_of_every_applicable_block_are_found_by_provider_through_the_mx() -> None:
    files = ShapingFiles([("rules.toml", parse(RULES))])
    found = files.rules("any-yahoo-hosted.test", YAHOO_SITE)
    assert [label for label, _ in found] == [
        "provider yahoo (rules.toml) rule 1",
        "provider yahoo (rules.toml) rule 2",
    ]
    assert [label for label, _ in files.rules("example.com", "mx.example.com")] == [
        "domain example.com (rules.toml) rule 1"
    ]
    shipped = ShapingFiles([("shipped.toml", parse(RULES))], mx_only=frozenset({"shipped.toml"}))
    assert shipped.rules("example.com", "route:relay.test:25") == []  # a static route


def test_an_adaptive_rate_needs_its_floor_below_its_ceiling() -> None:
    with pytest.raises(ConfigError, match="floor must not be above ceiling"):
        parse('[default.adaptive_rate]\nfloor = "10/s"\nceiling = "100/m"\n')


def test_aimd_halves_down_to_the_floor_and_climbs_back_after_each_quiet_interval() -> None:
    config = AdaptiveRate(floor="10/m", ceiling="120/m", increase="30/m", every=60.0)
    aimd = Aimd.start(config, Rate(100, 60), now=0.0)  # the configured rate, under the ceiling
    assert str(aimd.rate) == "100/m"
    changes = [aimd.backed_off(now) for now in (1.0, 2.0, 3.0, 4.0, 5.0)]
    assert str(aimd.rate) == "10/m" and changes == [True, True, True, True, False]
    assert not aimd.succeeded(30.0)  # not yet a minute since the last change
    assert aimd.succeeded(65.0) and str(aimd.rate) == "40/m"
    for now in (130.0, 200.0, 270.0):
        aimd.succeeded(now)
    assert str(aimd.rate) == "120/m"  # capped at the ceiling
    assert not aimd.succeeded(400.0)


def test_a_path_suspension_stops_one_site_of_a_source_and_a_tenant_one_on_one_site() -> None:
    registry = SuspensionRegistry(clock=lambda: 100.0)
    registry.suspend(Suspension("source", "ip1", "TS04", until=200.0, site="yahoo-site"))
    registry.suspend(Suspension("tenant", "bulk", "blocked", until=200.0, site="gmail-site"))
    assert registry.for_path("ip1", "yahoo-site") is not None
    assert registry.for_path("ip1", "gmail-site") is None
    assert registry.for_path("ip2", "yahoo-site") is None

    def job(tenant: str, site: str) -> Job:
        meta = MessageMeta(id="m", sender="", recipients=["a@x"], received_at=0, size=1)
        meta.tenant = tenant
        found = Job(Message(meta, b""), "x", ["a@x"], "x")
        found.site = site
        return found

    assert registry.for_job(job("bulk", "gmail-site")) is not None
    assert registry.for_job(job("bulk", "yahoo-site")) is None
    assert registry.for_job(job("other", "gmail-site")) is None
    assert registry.resume("source", "ip1", "yahoo-site")
    assert registry.for_path("ip1", "yahoo-site") is None


def test_queue_names_give_their_tenant_and_campaign() -> None:
    assert _tenant_campaign("spring:acme@example.com") == ("acme", "spring")
    assert _tenant_campaign("acme@example.com") == ("acme", "")
    assert _tenant_campaign("spring:example.com") == ("", "spring")
    assert _tenant_campaign("example.com") == ("", "")


def action(rule: str = "r", source: str = "ip1", started: float = 100.0) -> Automated:
    return Automated(
        id=f"{rule}-{source}-{started}",
        action="suspend",
        rule=rule,
        trigger="3/h",
        site="site",
        source=source,
        reply="421 4.7.0 [TS04]",
        started=started,
        until=started + 60,
    )


async def test_the_store_counts_matches_to_the_threshold_and_starts_one_action_per_scope(
    tmp_path: Path,
) -> None:
    store = AutomationStore(tmp_path / "store.db")
    other = AutomationStore(tmp_path / "store.db")  # another worker on the same store
    await store.start()
    await other.start()
    try:
        assert await store.matched(action(started=100.0), 3, 3600) is None
        assert await other.matched(action(started=101.0), 3, 3600) is None
        started = await store.matched(action(started=102.0), 3, 3600)
        assert started is not None and started.id == "r-ip1-102.0"
        assert await other.matched(action(started=103.0), 1, 0) is None  # one is running
        assert await other.matched(action(source="ip2", started=103.0), 1, 0) is not None
        assert [a.source for a in await other.active(110.0)] == ["ip1", "ip2"]
        version = await other.version()
        ended = await store.end("r-ip1-102.0", "lifted by an operator", 120.0)
        assert ended is not None and ended.ended_why == "lifted by an operator"
        assert await other.version() > version
        assert await store.end("r-ip1-102.0", "again", 121.0) is None
        expired = await store.expire(163.0)
        assert [a.source for a in expired] == ["ip2"] and await other.expire(164.0) == []
        assert await store.active(164.0) == []
        # a match an hour later than the others starts counting again
        assert await store.matched(action(started=5000.0), 3, 3600) is None
    finally:
        await store.stop()
        await other.stop()
