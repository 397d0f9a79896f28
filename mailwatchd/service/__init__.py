"""The daemon: start-up, workers, scheduler, health, sd_notify and the journal."""
