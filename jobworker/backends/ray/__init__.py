"""The Ray cluster backend: jobworker's API and CLI in front of jobs on many machines.

* :mod:`.agent` -- one long-lived agent actor per Ray node, pinned to it, running
  jobworker's own local :class:`~jobworker.backends.local.manager.JobManager` there
  (spawning, containment plugins, the output spool with resume offsets).
* :mod:`.guard` -- the agent's guard process: the node's jobs die with the agent or its
  raylet.
* :mod:`.tree` -- the node-side fallback containment (the job's process tree) and the
  sweep of processes a lost agent left behind.
* :mod:`.stdin` -- a cluster job's stdin, the front's side and the agent's.
* :mod:`.front` -- the front server's engine (the backend facade): relays the job's life
  to the front's plugins, detects lost nodes, and streams output from the agents;
  :mod:`.placement` places jobs (placement groups from the job's ``--cpu``/``--memory``,
  ``--node`` pins); :mod:`.table` is its picture of every node's jobs, merged from the
  agents' heartbeats; :mod:`.nodes` a node and a bounded call to its agent; :mod:`.auth`
  whether the cluster authenticates (the front refuses one that does not).
* :mod:`.plugin` -- the ``ray`` plugin: ``jobworker serve --plugin ray --ray-address ...``.

Ray itself is an optional dependency (``pip install 'jobworker[ray]'``); only these
modules import it, and only when the plugin is used.
"""
