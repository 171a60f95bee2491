"""flowtunnel: carry NetFlow v5/v9/IPFIX exports over HTTP(S) without losing a record."""

__version__ = "0.1.0"
__all__ = ["__version__"]
