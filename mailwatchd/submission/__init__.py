"""The front door: the sendmail command, the SMTP listener and its sessions, the durable write into new/."""
