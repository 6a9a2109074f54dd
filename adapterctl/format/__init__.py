"""The files: adapter_config.json, safetensors, key names and directory layouts. No torch here."""
