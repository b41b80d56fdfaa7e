"""Site model, limits and allocation. Never imports an adapter or MQTT."""
