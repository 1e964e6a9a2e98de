"""Which message goes next and what an attempt means: scheduler, limits, outcomes, policy, DSNs.
May use: transports (through their protocol), queue, ops, config, units, headers."""
