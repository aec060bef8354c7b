"""The local engine: jobs on this host, each spawned, contained, isolated and spooled here."""
