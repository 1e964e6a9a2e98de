"""The listener: aiosmtpd protocol and hooks, reading and checking DATA, trace fields.
May use: queue (to commit), ops, config, units, headers. Never the upstream or the tokens."""
