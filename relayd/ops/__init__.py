"""Running the daemon: health HTTP, metrics, logging, sd_notify, the pid file, reload rules.
May use: config, units. Nothing above: the rest of relayd reports through these."""
