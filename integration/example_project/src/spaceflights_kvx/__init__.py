"""spaceflights_kvx: kvx-runtime's example Kedro project."""

__version__ = "0.1"
