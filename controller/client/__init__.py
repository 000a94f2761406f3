"""The ``a67`` command line for people: sign in, nodes, apps, databases, metrics.

It talks to the controller's user-facing gRPC port (the same API the gateway
exposes as REST). Modules:

* :mod:`~controller.client.kdf` - the client-side password derivation (docs/auth.md);
* :mod:`~controller.client.config` - where the controller is and the stored session;
* :mod:`~controller.client.session` - the gRPC channel, tokens and automatic refresh;
* :mod:`~controller.client.errors` - one plain sentence and an exit code per failure;
* :mod:`~controller.client.render` - tables for people, JSON and CSV for scripts;
* :mod:`~controller.client.appdir` - the ``a67.toml`` manifest and packing a directory;
* :mod:`~controller.client.app` and the ``cmd_*`` modules - the Click commands.
"""
