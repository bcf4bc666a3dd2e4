"""Stand-in for Forge's modules_forge package: its presence is how Forge is told apart from AUTOMATIC1111."""
