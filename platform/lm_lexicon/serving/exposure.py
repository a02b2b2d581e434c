"""No unauthenticated API beyond this machine unless asked for: the HTTP server refuses to start on a non-loopback
address (``0.0.0.0``, a LAN address, a hostname that resolves elsewhere) while no bearer token is configured, unless
the caller opts out explicitly (``lm-lexicon serve --insecure``, ``insecure: true`` in the Serve args).

Checked twice: by ``lm-lexicon serve`` before Ray starts (same machine, same environment as the ingress), and by the
ingress replica itself at start-up (the place where the token is read, so ``serve run serve_app/serve_config.yaml``
and ``serve deploy`` are covered too: the application fails to deploy with this message).
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Optional

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class ExposureError(ValueError):
    """The server would expose an unauthenticated API to the network."""


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost). Wildcards
    (``0.0.0.0``, ``::``), other addresses and names that do not resolve are not loopback."""
    name = host.strip().strip("[]")
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0].split("%")[0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return False  # cannot tell where it binds: treat it as exposed
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_exposure(host: str, token: Optional[str], insecure: bool, *, token_env: Optional[str],
                   opt_out: str = "--insecure") -> Optional[str]:
    """Raise :class:`ExposureError` when ``host`` is not loopback, no token is set and ``insecure`` is false.
    Returns a warning to show when the server runs exposed on purpose, None otherwise. ``opt_out`` names the
    opt-out in the message (the CLI flag, or the Serve args field)."""
    if token or is_loopback(host):
        return None
    if insecure:
        return (f"WARNING: serving on {host} without authentication ({opt_out}): anyone who can reach this port "
                "can use the API")
    env = token_env or "LM_LEXICON_API_TOKEN"
    raise ExposureError(
        f"refusing to serve on {host} without authentication: that address accepts connections from other "
        f"machines and no bearer token is set. Either set a token (export {env}=<secret>; clients then send "
        f"'Authorization: Bearer <secret>'), or bind to 127.0.0.1, or pass {opt_out} to serve without "
        "authentication anyway.")
