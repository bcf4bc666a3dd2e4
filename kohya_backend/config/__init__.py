"""config_params: schema, parsing, validation and canonical formatting."""
