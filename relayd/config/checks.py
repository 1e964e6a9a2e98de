"""Checks across settings, after every key parsed: what must go together, and values
that Entra ID and Exchange would only refuse later, with less clear words."""

from __future__ import annotations

from typing import TYPE_CHECKING

from relayd.config.fields import MICROSOFT_TRANSPORTS, ConfigError
from relayd.identifiers import is_address, is_domain_name, is_guid

if TYPE_CHECKING:
    from relayd.config import Settings, UpstreamSettings


def check_consistency(settings: Settings, source: str) -> None:
    upstream, oauth, retry = settings.upstream, settings.oauth, settings.retry
    if upstream.transport in MICROSOFT_TRANSPORTS and not upstream.mailbox:
        raise ConfigError(
            source, "upstream.mailbox", "required: the address of the sending mailbox"
        )
    signing_in = [
        (f"routes[{index}].transport", route.transport)
        for index, route in enumerate(settings.routes)
        if route.transport in MICROSOFT_TRANSPORTS
    ]
    if upstream.transport in MICROSOFT_TRANSPORTS:
        signing_in.insert(0, ("upstream.transport", upstream.transport))
    for key in ("tenant_id", "client_id"):
        if signing_in and not getattr(oauth, key):
            where, transport = signing_in[0]
            raise ConfigError(source, f"oauth.{key}", f"required when {where}={transport}")
    _check_graph(upstream, source)
    _check_identities(settings, source)
    if oauth.authority and not oauth.authority.startswith("https://"):
        raise ConfigError(source, "oauth.authority", "must be an https:// URL")
    if retry.min_delay > retry.max_delay:
        raise ConfigError(source, "retry.min_delay", "must not be longer than retry.max_delay")
    if oauth.retry_min_delay > oauth.retry_max_delay:
        raise ConfigError(
            source, "oauth.retry_min_delay", "must not be longer than oauth.retry_max_delay"
        )
    for section, key in (("upstream", "ca_file"), ("oauth", "ca_file")):
        path = getattr(getattr(settings, section), key)
        if path is not None and not path.is_file():
            raise ConfigError(source, f"{section}.{key}", f"{path} does not exist")


def _check_graph(upstream: UpstreamSettings, source: str) -> None:
    url = upstream.graph_url
    if not url.startswith("https://") or len(url) <= len("https://"):
        raise ConfigError(
            source,
            "upstream.graph_url",
            f"must be an https:// URL such as https://graph.microsoft.com/v1.0, got {url!r}",
        )


def _check_identities(settings: Settings, source: str) -> None:
    """Values that Entra ID and Exchange would only refuse later, with less clear words."""
    upstream, oauth = settings.upstream, settings.oauth
    if upstream.mailbox and not is_address(upstream.mailbox):
        raise ConfigError(
            source,
            "upstream.mailbox",
            f"invalid: {upstream.mailbox!r} is not an email address (e.g. relay@contoso.com)",
        )
    for address in upstream.send_as:
        if not is_address(address):
            raise ConfigError(
                source, "upstream.send_as", f"invalid: {address!r} is not an email address"
            )
    if oauth.tenant_id and not (is_guid(oauth.tenant_id) or is_domain_name(oauth.tenant_id)):
        raise ConfigError(
            source,
            "oauth.tenant_id",
            f"invalid: {oauth.tenant_id!r} is neither a GUID nor a domain name; copy the"
            " Directory (tenant) ID from the app registration's overview",
        )
    if oauth.client_id and not is_guid(oauth.client_id):
        raise ConfigError(
            source,
            "oauth.client_id",
            f"invalid: {oauth.client_id!r} is not a GUID; copy the Application (client) ID"
            " from the app registration's overview",
        )
