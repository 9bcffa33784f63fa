"""What became of each attempt: replies -> Delivered | TransientFailure | Bounce | Expired."""

from epoxi.outcomes.disposition import Disposition
from epoxi.outcomes.synthetic import Synthetic

__all__ = ["Disposition", "Synthetic"]
