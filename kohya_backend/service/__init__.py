"""The REST API, the home folder layout and the training service that the API, the `jobs` CLI and the UI share."""
