"""What to run: grid files (YAML) validated against the catalog of models, methods and prompt sets, expanded into
jobs with stable ids."""
