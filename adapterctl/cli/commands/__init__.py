"""One module per command; each is registered in `adapterctl.cli.main`."""
