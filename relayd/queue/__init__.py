"""The spool, the one writer of queue files: commit, state moves, recovery, census, `relayd queue`.
May use: ops (pid file), config, units, headers. Nothing that delivers or accepts mail."""
