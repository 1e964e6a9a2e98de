"""What the sign-in must cover: one resource (an API with its scopes) per token.

A delegated refresh token belongs to the user and the client, not to one API
(Microsoft identity platform, "Refresh tokens"), so one sign-in can redeem access
tokens for Exchange's SMTP AUTH and for Microsoft Graph. Entra ID issues an access
token for one resource at a time (a token request naming two answers AADSTS28000), so
each resource below is a token of its own: asked consent for together at sign-in,
redeemed one by one. Which of them a configuration needs follows from
``upstream.transport`` and ``upstream.graph_large_messages``; nothing here is kept per
process, so one set of these serves each mailbox of a later multi-mailbox relay.
"""

from __future__ import annotations

from dataclasses import dataclass

from relayd.config import Settings

GRAPH = "https://graph.microsoft.com"
MAIL_SEND = f"{GRAPH}/Mail.Send"
MAIL_READ_WRITE = f"{GRAPH}/Mail.ReadWrite"


@dataclass(frozen=True)
class Resource:
    """One access token relayd keeps: its name, its scopes and what it is for."""

    name: str  # "smtp", "graph", "graph_large": label in `auth status` and the state file
    scopes: tuple[str, ...]
    purpose: str  # what a person reads: "sending by SMTP AUTH"
    required: bool = True  # False: a capability (large messages); mail flows without it

    @property
    def permissions(self) -> str:
        """The delegated permissions to grant, as the app registration names them."""
        return ", ".join(scope.rsplit("/", 1)[-1] for scope in self.scopes)

    def consent_advice(self, login_command: str) -> str:
        """What to do when Entra ID answers AADSTS65001 for this resource."""
        return (
            f"the app registration lacks consent for {self.permissions} ({' '.join(self.scopes)})"
            f", needed for {self.purpose}: add the delegated permission in the app"
            f" registration (API permissions) and grant admin consent, or consent when"
            f" {login_command} asks again"
        )


def smtp_resource(settings: Settings) -> Resource:
    return Resource("smtp", tuple(settings.oauth.scopes), "sending by SMTP AUTH")


GRAPH_SEND = Resource("graph", (MAIL_SEND,), "sending through Microsoft Graph")
# Drafts and upload sessions need Mail.ReadWrite; sending the draft needs Mail.Send.
GRAPH_LARGE = Resource(
    "graph_large",
    (MAIL_READ_WRITE, MAIL_SEND),
    "messages over Graph's 4 MB request limit (upstream.graph_large_messages)",
    required=False,
)


def resources_for(settings: Settings) -> tuple[Resource, ...]:
    """The tokens ``settings`` need, the one the transport starts with first."""
    transport = settings.upstream.transport
    large = (GRAPH_LARGE,) if settings.upstream.graph_large_messages else ()
    if transport == "graph":
        return (GRAPH_SEND, *large)
    if transport == "auto":
        return (smtp_resource(settings), GRAPH_SEND, *large)
    return (smtp_resource(settings),)


def all_scopes(resources: tuple[Resource, ...]) -> list[str]:
    """Every scope, once, in order: what the sign-in asks consent for."""
    return list(dict.fromkeys(scope for resource in resources for scope in resource.scopes))
