"""The ``flowtunnel_build_info`` metric both daemons serve: version and Python, value 1 (Prometheus idiom)."""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Gauge

from flowtunnel import __version__

__all__ = ["register_build_info"]


def register_build_info(registry: CollectorRegistry, *, component: str) -> None:
    """Add ``flowtunnel_build_info{version, python, component} 1`` to ``registry``."""
    info = Gauge("flowtunnel_build_info", "flowtunnel version and Python running it (value 1)",
                 ["version", "python", "component"], registry=registry)
    info.labels(__version__, platform.python_version(), component).set(1)
