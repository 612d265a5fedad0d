"""fleet_ops: kvx-runtime's real-world-layout test project."""

__version__ = "0.1.0"
