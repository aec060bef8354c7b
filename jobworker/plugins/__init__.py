"""Built-in plugins. Each module is registered as a plugin under the name in BUILTIN_PLUGINS."""
