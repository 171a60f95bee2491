"""Allows ``python -m flowtunnel``."""

from flowtunnel.cli import main

raise SystemExit(main())
