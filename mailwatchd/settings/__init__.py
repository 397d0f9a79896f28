"""Settings: the env file and the environment, validated once (relays, the listener, values)."""
