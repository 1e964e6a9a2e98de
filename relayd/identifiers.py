"""The shapes of the identifiers an operator copies into the configuration: Entra ID's
GUIDs, domain names and mailbox addresses. Checked at load time, because Entra ID and
Exchange would refuse them only later, and in words that do not name the setting."""

from __future__ import annotations

import re

_GUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_DOMAIN_LABEL = re.compile(r"^(?!-)(?:[^\W_]|-){1,63}(?<!-)$")  # letters (IDN too), digits, -
_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"]+@([^@\s<>()\[\],;:\"]+)$")


def is_guid(text: str) -> bool:
    return bool(_GUID.match(text))


def is_domain_name(text: str) -> bool:
    """A DNS name with at least two labels and an alphabetic top-level label."""
    labels = text.rstrip(".").split(".")
    return (
        len(labels) >= 2
        and all(_DOMAIN_LABEL.match(label) for label in labels)
        and labels[-1].isalpha()
    )


def is_address(text: str) -> bool:
    """local@domain, as Exchange Online accepts for a mailbox (no display name, no <>)."""
    match = _ADDRESS.match(text)
    return bool(match) and is_domain_name(match.group(1))
