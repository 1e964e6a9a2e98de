"""The auth states: decided by relayd.auth, exported by relayd.ops.metrics.

They live here, below both, so that neither imports the other for them (the metrics
module once imported the token manager for these names, and the token manager the
metrics module for its type).
"""

# Auth states, as exported in relayd_auth_state{state} and shown by `relayd auth status`.
OK = "ok"  # a usable access token is cached or can be obtained silently
REFRESHING = "refreshing"  # a refresh is under way
NO_TOKEN = "no_token"  # noqa: S105 (a state name) — nobody has signed in yet: run `relayd auth login`
REAUTH_REQUIRED = "reauth_required"  # invalid_grant (expired/revoked): sign in again
UNAVAILABLE = "unavailable"  # token endpoint unreachable or failing: retried by itself
REJECTED = "rejected"  # upstream refused a fresh token (535 5.7.3 twice)
AUTH_STATES = (OK, REFRESHING, NO_TOKEN, REAUTH_REQUIRED, UNAVAILABLE, REJECTED)
# Deliveries wait in these states: there is no token to hand out.
BLOCKED_STATES = (NO_TOKEN, REAUTH_REQUIRED, UNAVAILABLE)
# "not_used": the maildir transport signs in nowhere, so there is nothing to be
# unhealthy about (sandbox and staging systems must not page anyone for auth).
NOT_USED = "not_used"
