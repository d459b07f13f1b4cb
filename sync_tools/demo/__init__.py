"""``sync-tools demo``: the whole loop on loopback, self-contained (see ARCHITECTURE.md, "The demo")."""
