"""
Who a client is, as policyd counts it: an address prefix, as a compact key.

Clients are grouped by prefix (IPv4 /32 and IPv6 /64 by default): a host
with many addresses in one /64 is one client.  `ClientKeys` turns an address
into an integer key for the tracker's tables and back into text for logs and
metrics; every tracker backend uses it, so they all group alike.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from typing import Final

__all__ = ["UNKNOWN_CLIENT", "ClientKeys"]

# The key under which clients without a usable address are counted.
UNKNOWN_CLIENT: Final = -1
_IPV6_TAG: Final = 1 << 128  # keeps IPv6 keys apart from IPv4 ones

# A request's address is turned into a key in observe, again in client() when
# the request is scored and in record_refusal when it is refused, and a
# client's requests repeat its address: a lookup costs ~0.1 µs, a parse
# ~0.3 µs (and the text of a key ~0.35 µs).  Bounded; pure functions.
_KEY_CACHE_SIZE: Final = 8192


class ClientKeys:
    """Turns client addresses into compact integer keys, grouped by prefix."""

    def __init__(self, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> None:
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self._v4_mask = ((1 << ipv4_prefix) - 1) << (32 - ipv4_prefix)
        self._v6_mask = ((1 << ipv6_prefix) - 1) << (128 - ipv6_prefix)
        # Cached per instance: the prefixes are the instance's.
        self.key: Callable[[str], int] = functools.lru_cache(_KEY_CACHE_SIZE)(self._key)
        self.describe: Callable[[int], str] = functools.lru_cache(_KEY_CACHE_SIZE)(
            self._describe
        )

    def _key(self, address: str) -> int:
        """The key of *address*; `UNKNOWN_CLIENT` if it is not an IP address."""
        try:
            if ":" in address:
                packed = socket.inet_pton(socket.AF_INET6, address)
                return (int.from_bytes(packed, "big") & self._v6_mask) | _IPV6_TAG
            return int.from_bytes(socket.inet_aton(address), "big") & self._v4_mask
        except (OSError, ValueError):
            # inet_aton accepts shorthands such as "10.1"; Postfix never sends
            # them, and treating them as addresses would be harmless anyway.
            return UNKNOWN_CLIENT

    def _describe(self, key: int) -> str:
        """The prefix a key stands for, e.g. ``192.0.2.7`` or ``2001:db8::/64``."""
        if key == UNKNOWN_CLIENT:
            return "unknown"
        if key & _IPV6_TAG:
            packed = (key & ~_IPV6_TAG).to_bytes(16, "big")
            text = socket.inet_ntop(socket.AF_INET6, packed)
            return text if self.ipv6_prefix == 128 else f"{text}/{self.ipv6_prefix}"
        text = socket.inet_ntoa(key.to_bytes(4, "big"))
        return text if self.ipv4_prefix == 32 else f"{text}/{self.ipv4_prefix}"
