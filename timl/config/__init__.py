"""The arguments of a run: small dataclasses per concern, parsed flat from the command line, YAML or JSON."""
