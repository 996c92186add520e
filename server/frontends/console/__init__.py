"""The web console: a single page served at ``/console`` by the HTTP front end, and what it asks of the server.

The page (``static/``: plain HTML, CSS and JavaScript, with uPlot vendored from its npm package for the charts) is
only another client of the public APIs: it lists models with the repository index, reads config, metadata and
``/metrics``, loads and unloads through the repository API and chats through ``/v1``, sending the restricted-API
header and the OpenAI key a user typed in, so it can do nothing a client with the same credentials could not.
``console_app`` adds one route, ``settings.json``, that tells the page what it cannot probe cheaply: the model
control mode, which API groups want which header (the names, never the values), whether ``/v1`` wants a key, and
which ``/v1`` routes exist. Being a front end, it may import any layer below ``server.frontends``.
"""

from server.frontends.console.app import ConsoleSettings, console_app

__all__ = ["ConsoleSettings", "console_app"]
