"""Operator tools built from the daemon's own parts: `relayd send-test`.
May use: everything below the daemon wiring (delivery, transports, queue, auth, ops, config)."""
