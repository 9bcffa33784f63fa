"""Epoxi: a Mail Transfer Agent for people who send a lot of mail."""

__version__ = "0.1.0"
__all__ = ["__version__"]
