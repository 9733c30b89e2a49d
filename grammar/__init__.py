"""Package data: the rule grammar. Installed as dynproxy.grammar (see pyproject.toml)."""
