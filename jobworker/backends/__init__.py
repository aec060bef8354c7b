"""The engines that run jobs, behind one seam (:mod:`jobworker.backends.base`).

``local/`` runs jobs on this host; ``ray/`` places them on a Ray cluster's nodes, where
each node runs the local engine. A third-party backend is one more package of the same
shape, handed to the server by a plugin's ``jobworker_make_backend`` (docs/plugins.md).
"""
