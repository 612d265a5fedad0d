"""Host aliases (``run_config.network.host_aliases``) inside the kvx-runtime process.

The container entrypoint appends them to ``/etc/hosts`` when it can; in a non-root container
it cannot, so kvx-runtime also resolves them itself: ``socket.getaddrinfo`` (which requests,
aiohttp, gcsfs and MLflow all use) answers alias names with their configured address.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

from kvx_runtime import settings
from kvx_runtime.errors import ConfigError

ENV_VAR = settings.HOST_ALIASES.name
_installed: dict[str, str] = {}


def parse_host_aliases(text: str) -> dict[str, str]:
    """``"10.0.0.5=mlflow.internal,mlflow;10.0.0.6=fs"`` -> {hostname: ip}."""
    mapping: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        ip, sep, names = entry.partition("=")
        try:
            ipaddress.ip_address(ip.strip())
        except ValueError:
            raise ConfigError(f"{ENV_VAR}: {ip.strip()!r} is not an IP address (entry {entry!r})") from None
        hostnames = [n.strip() for n in names.split(",") if n.strip()]
        if not sep or not hostnames:
            raise ConfigError(f"{ENV_VAR}: entry {entry!r} must look like IP=name1,name2")
        for name in hostnames:
            mapping[name.lower()] = ip.strip()
    return mapping


def install_host_aliases(text: str | None = None) -> dict[str, str]:
    """Resolve the aliases of ``KVX_HOST_ALIASES`` (or ``text``) in this process."""
    text = os.environ.get(ENV_VAR, "") if text is None else text
    mapping = parse_host_aliases(text)
    if not mapping:
        return {}
    if not _installed:
        original = socket.getaddrinfo

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(host, bytes):
                host = host.decode()
            if isinstance(host, str) and host.lower() in _installed:
                host = _installed[host.lower()]
            return original(host, *args, **kwargs)

        socket.getaddrinfo = getaddrinfo
    _installed.update(mapping)
    return mapping
