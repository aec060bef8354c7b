"""The ``jobworker`` command: ``serve`` runs the server, the other commands are its clients.

Every failure is one line on stderr and an exit status (docs/cli.md has the table):

====  ===================================================================================
0     success
1     the server refused or failed the request, or could not be reached
      (``jobworker: CODE: message``)
2     usage or local configuration error (``jobworker: error: message``)
126   ``run``, ``start``: the command exists on the server but cannot be executed
127   ``run``, ``start``: the command does not exist on the server
130   interrupted (Ctrl-C); ``run`` stops its job first
====  ===================================================================================

``run`` exits with the job's own status instead: its exit code, or 128+N after signal N.

Modules: :mod:`~jobworker.cli.main` (entry point and parser), :mod:`~jobworker.cli.client`
(client commands), :mod:`~jobworker.cli.options` (their options), :mod:`~jobworker.cli.admin`
(``plugins``, ``certs``), :mod:`~jobworker.cli.serve` (``serve``),
:mod:`~jobworker.cli.common` (what they share).
"""

from jobworker.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
