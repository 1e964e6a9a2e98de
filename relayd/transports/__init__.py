"""The only code that talks to the upstream: the Transport protocol and one implementation each.
May use: auth (tokens), ops, config, units. Never the spool: a transport returns an Attempt."""
