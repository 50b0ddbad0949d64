"""Configuration: strict models, YAML loading with located errors, secrets."""
