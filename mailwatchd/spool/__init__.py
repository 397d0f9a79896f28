"""The spool: files and states, the only code that moves a message; intake, recovery, the queue listing."""
