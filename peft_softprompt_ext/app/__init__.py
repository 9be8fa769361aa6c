"""The application on top of the plugin: the ``softprompt`` CLI (one module per subcommand), its training recipe,
the built-in data and the bundled real models. Optional: ``pip install "peft-softprompt-ext[app]"``; nothing in
the plugin imports it."""
