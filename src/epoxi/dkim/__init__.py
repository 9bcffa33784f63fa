"""DKIM: keys (``keys.py``) and signing at the ingest door (``signer.py``)."""

from epoxi.dkim.keys import DkimKey, generate, load_key
from epoxi.dkim.signer import Signed, Signer

__all__ = ["DkimKey", "Signed", "Signer", "generate", "load_key"]
