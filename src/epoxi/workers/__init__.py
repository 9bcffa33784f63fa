"""What a worker process knows of the machine it shares: its place, and its supervisor.

``epoxi serve --workers N`` runs one supervisor (:mod:`epoxi.supervisor`) and N workers, each
a full Epoxi on its own spool shard. The supervisor binds the listening sockets once and
passes them down (:class:`Placement`), and hands out the machine's connection slots and rate
shares over one control channel per worker (:mod:`epoxi.workers.wire`,
:class:`~epoxi.workers.link.SupervisorLink`).
"""

from epoxi.workers.placement import Placement

__all__ = ["Placement"]
