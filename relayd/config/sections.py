"""The sections of relayd.yaml, each a frozen dataclass of declared settings.

Every setting is a field whose metadata names its parser (``relayd.config.fields``):
the loader (``relayd.config``), the environment overrides, check-config's output and
the JSON Schema (``relayd.config.schema``) all walk these declarations.
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass, field
from pathlib import Path

from relayd.config.fields import (
    LOOPBACK,
    LOOPBACK_ONLY,
    TRANSPORTS,
    MiB,
    Secret,
    _boolean,
    _choice,
    _duration,
    _integer,
    _message_size,
    _networks,
    _path,
    _port,
    _secret,
    _setting,
    _size,
    _text,
    _text_list,
)
from relayd.config.routes import RouteSettings
from relayd.units import format_size

# --- sections ------------------------------------------------------------------------


@dataclass(frozen=True)
class ListenSettings:
    # "localhost": both loopbacks, 127.0.0.1 and ::1 (where the host has IPv6), so an
    # application told "localhost" connects whichever its resolver prefers.
    address: str = _setting(LOOPBACK, _text)
    port: int = _setting(2525, _port)
    allowed_clients: tuple = _setting(LOOPBACK_ONLY, _networks, lambda v: [str(n) for n in v])
    # The largest message relayd hands to the upstream (set it to the upstream's limit).
    # RFC 1870: relayd advertises and accepts 4 KiB less, measured without the dots
    # added for transparency; those 4 KiB hold what relayd adds (Received:, a missing
    # Date:/Message-ID:, the sender policy's From:), so whatever gets 250 fits.
    max_message_size: int = _setting(35 * MiB, _message_size, format_size)
    max_recipients: int = _setting(500, _integer(1))
    # RFC 5321 §4.5.3.1.6: 998 characters + CRLF. Longer lines get 500 5.5.6.
    max_line_length: int = _setting(998, _integer(78, 1_000_000))
    max_connections: int = _setting(100, _integer(1))
    idle_timeout: float = _duration(300, positive=True)
    # Name in the greeting and in Received: headers; empty means the host's FQDN.
    hostname: str = _setting("", _text)
    # RFC 5321 §6.3: a message with more Received: headers than this is looping.
    max_received_headers: int = _setting(50, _integer(1))
    # SMTP smuggling defence (RFC 5321 §2.3.8): "reject" answers 550 to a message
    # with a bare CR or LF; "normalize" turns them into CRLF. Only CRLF.CRLF ends DATA.
    bare_line_endings: str = _setting("reject", _choice("reject", "normalize"))
    # How long open SMTP sessions may finish after SIGTERM.
    shutdown_grace: float = _duration(30)


@dataclass(frozen=True)
class SpoolSettings:
    directory: Path = _setting(Path("/var/lib/relayd/spool"), _path, str)
    min_free_space: int = _size(100 * MiB)


@dataclass(frozen=True)
class UpstreamSettings:
    # "smtp" forwards to Microsoft 365 by SMTP AUTH; "graph" by Microsoft Graph's
    # sendMail; "auto" by SMTP, moving to Graph while Exchange answers 535 5.7.139
    # (SMTP AUTH disabled); "maildir" writes into a local Maildir (sandbox and staging
    # systems that must never send real mail).
    transport: str = _setting("smtp", _choice(*TRANSPORTS))
    host: str = _setting("smtp.office365.com", _text)
    port: int = _setting(587, _port)
    # Microsoft 365 only offers STARTTLS on 587; implicit TLS is for other servers.
    tls: str = _setting("starttls", _choice("starttls", "implicit"))
    mailbox: str = _setting("", _text)
    send_as: tuple = _setting((), _text_list, list)
    from_rewrite: bool = _setting(True, _boolean)
    ca_file: Path | None = _setting(None, _path, lambda v: str(v) if v else None)
    max_connections: int = _setting(3, _integer(1))
    rate_limit_per_minute: int = _setting(30, _integer(0))
    daily_recipient_limit: int = _setting(10_000, _integer(0))
    timeout: float = _duration(60, positive=True)
    # The wait for the reply to the final dot (RFC 5321 §4.5.3.2.6: 10 minutes), plus a
    # second per 32 KiB of the message for its upload. upstream.timeout is for commands.
    data_timeout: float = _duration(600, positive=True)
    idle_timeout: float = _duration(60)
    # How long the whole upstream pauses after 421 / 432 4.3.2 (throttling).
    throttle_pause: float = _duration(60)
    helo_name: str = _setting("", _text)
    maildir: Path = _setting(Path("/var/lib/relayd/maildir"), _path, str)
    # Microsoft Graph (transport graph or auto). Sovereign clouds use other hosts.
    graph_url: str = _setting("https://graph.microsoft.com/v1.0", _text)
    # Messages over Graph's 4 MB request limit: draft + upload sessions (needs the
    # delegated permission Mail.ReadWrite, asked for at sign-in); off, they are held.
    graph_large_messages: bool = _setting(False, _boolean)
    # auto: how often SMTP is tried again while mail goes through Graph.
    smtp_probe_interval: float = _duration(3600, positive=True)


@dataclass(frozen=True)
class RetrySettings:
    min_delay: float = _duration(60, positive=True)
    max_delay: float = _duration(3600)
    max_age: float = _duration(5 * 86400)


@dataclass(frozen=True)
class OAuthSettings:
    tenant_id: str = _setting("", _text)
    client_id: str = _setting("", _text)
    client_secret: Secret | None = _setting(None, _secret)
    client_secret_file: Path | None = _setting(None, _path, lambda v: str(v) if v else None)
    authority: str = _setting("", _text)
    scopes: tuple = _setting(("https://outlook.office.com/SMTP.Send",), _text_list, list)
    redirect_uri: str = _setting("http://localhost:8400/", _text)
    token_cache: Path = _setting(Path("/var/lib/relayd/token_cache.json"), _path, str)
    ca_file: Path | None = _setting(None, _path, lambda v: str(v) if v else None)
    # Redeem the refresh token this often even when no mail flows (90-day expiry).
    keepalive_interval: float = _duration(86400, positive=True)
    # Renew the access token when less than this is left.
    refresh_margin: float = _duration(600)
    http_timeout: float = _duration(30, positive=True)
    # How often the daemon looks at the cache file for a sign-in done by `relayd auth`.
    cache_poll_interval: float = _duration(5, positive=True)
    # Backoff between token refresh attempts while Entra ID fails (network, 5xx). MSAL
    # itself answers retries from cache for Retry-After (default 5 s) after a 5xx.
    retry_min_delay: float = _duration(15, positive=True)
    retry_max_delay: float = _duration(900)

    @property
    def effective_authority(self) -> str:
        if self.authority:
            return self.authority.rstrip("/")
        return f"https://login.microsoftonline.com/{self.tenant_id}"


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = _setting(True, _boolean)
    address: str = _setting("127.0.0.1", _text)
    # Outside Prometheus' 9100-9999 exporter range (fully allocated), next to 2525.
    port: int = _setting(2526, _port)


@dataclass(frozen=True)
class LoggingSettings:
    # "auto": json under systemd / Docker / a pipe, console on a terminal.
    format: str = _setting("auto", _choice("auto", "json", "console"))
    level: str = _setting("info", _choice("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class Settings:
    listen: ListenSettings = field(default_factory=ListenSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    oauth: OAuthSettings = field(default_factory=OAuthSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    # Further mailboxes, chosen by envelope sender (relayd.config.routes); () = one.
    routes: tuple[RouteSettings, ...] = ()
    source: str = field(default="<defaults>", compare=False)

    @property
    def hostname(self) -> str:
        return self.listen.hostname or socket.getfqdn()

    @property
    def default_mailbox(self) -> str:
        """The default route's name: upstream.mailbox (lower case), or "default"."""
        return self.upstream.mailbox.strip().lower() or "default"


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Settings)
    if f.name not in ("source", "routes")
}
