"""End-to-end scenarios under a throwaway systemd 252 booted as PID 1 (see machine.py)."""
