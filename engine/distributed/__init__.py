"""How work is spread on Ray: the job bodies that both the CLI verbs and the thin jobs/ drivers call."""
