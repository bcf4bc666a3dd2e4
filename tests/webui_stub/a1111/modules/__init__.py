"""Stand-in for the WebUI's `modules` package (see tests/webui_stub/README.md for what each module mirrors)."""
