"""``epoxi serve --workers N``: one supervisor process and N workers, one per core.

The supervisor binds the SMTP and HTTP sockets once and passes them to every worker, moves
the spool shards of workers that no longer exist into the remaining ones, restarts a worker
that dies (on its own shard, so what it accepted is delivered), forwards SIGHUP and SIGTERM,
and keeps the machine's shaping (:mod:`epoxi.supervisor.board`). It handles no mail itself.
"""

from epoxi.supervisor.process import Supervisor

__all__ = ["Supervisor"]
