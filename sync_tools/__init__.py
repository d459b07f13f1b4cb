"""sync-tools: keep a fleet of machines on the newest builds of the services they run, event-driven."""

__version__ = "0.1.0"
