"""Traffic shaping automation, the pure part: what an action does and to what.

A rule of a shaping file (:class:`epoxi.shaping.files.AutomationRule`) matches a receiver's
reply; when its trigger is met it starts an :class:`Automated` action for its duration. The
action's scope follows from its kind:

* ``suspend``, ``bounce``, ``set_config``: the path the reply came on (egress source x site);
* ``suspend_tenant``, ``bounce_tenant``: the message's tenant on that site (every source);
* ``suspend_campaign``, ``bounce_campaign``: the message's campaign on that site.

The engine that watches replies and applies actions is :mod:`epoxi.delivery.automation`; the
durable copy is :mod:`epoxi.store.automation`.
"""

from __future__ import annotations

import msgspec

PATH_ACTIONS = frozenset({"suspend", "bounce", "set_config"})
SUSPEND_ACTIONS = frozenset({"suspend", "suspend_tenant", "suspend_campaign"})
BOUNCE_ACTIONS = frozenset({"bounce", "bounce_tenant", "bounce_campaign"})


class Automated(msgspec.Struct, kw_only=True):
    """One action that automation took: active from ``started`` until ``until``, or until
    an operator lifted it (``ended``)."""

    id: str
    action: str
    rule: str  # which rule: "provider yahoo (shaping.toml) rule 1"
    trigger: str  # "immediate" or the threshold, e.g. "5/h"
    site: str
    source: str = ""  # path actions
    tenant: str = ""  # *_tenant actions
    campaign: str = ""  # *_campaign actions
    setting: str = ""  # set_config: the setting ...
    value: str = ""  # ... and its value for the duration, as JSON
    reply: str = ""  # the reply that triggered it
    message_id: str = ""  # ... and the message it answered
    started: float
    until: float
    ended: float | None = None
    ended_why: str = ""  # "expired", "lifted by an operator"

    @property
    def scope(self) -> str:
        """What the action applies to, in words; one active action per (rule, scope)."""
        if self.action.endswith("_tenant"):
            return f"tenant {self.tenant} on {self.site}"
        if self.action.endswith("_campaign"):
            return f"campaign {self.campaign} on {self.site}"
        return f"path {self.source}->{self.site}"

    def covers(self, site: str, source: str, tenant: str, campaign: str) -> bool:
        """Whether mail on (``source``, ``site``) of ``tenant`` and ``campaign`` is in scope."""
        if site != self.site:
            return False
        if self.action.endswith("_tenant"):
            return tenant == self.tenant
        if self.action.endswith("_campaign"):
            return campaign == self.campaign
        return source == self.source

    def describe(self) -> str:
        what = self.action + (f" {self.setting}={self.value}" if self.setting else "")
        return f"{what} on {self.scope} ({self.rule}, trigger {self.trigger})"


def scoped(action: str, *, source: str, tenant: str, campaign: str) -> dict[str, str]:
    """The scope fields an action of kind ``action`` keeps from a reply's message and path;
    empty when the message has no tenant (or campaign) for a tenant (campaign) action."""
    if action.endswith("_tenant"):
        return {"tenant": tenant} if tenant else {}
    if action.endswith("_campaign"):
        return {"campaign": campaign} if campaign else {}
    return {"source": source}
