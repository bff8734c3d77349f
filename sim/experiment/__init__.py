"""Experiments: from a YAML file to a results directory.

* :mod:`sim.experiment.planning`: load and validate the experiment and every sweep point into a
  :class:`~sim.experiment.planning.Plan` of runs (coordinator side; also validates ``figures:``);
* :mod:`sim.experiment.runs`: the plain data a worker is sent (run settings, pass groups) and
  the hashes naming runs and passes;
* :mod:`sim.experiment.pass_group`: one pass group in a worker: the shared policy pass, each
  run's replay, its :mod:`~sim.experiment.extra_records`;
* :mod:`sim.experiment.store`: the results directory (its lock, run files, the summary table);
* :mod:`sim.experiment.runner`: ``kvsim run``: traces, skipping complete runs, scheduling pass
  groups on local processes or Dask, progress, the summary;
* :mod:`sim.experiment.worker`: a local worker process's start (Ctrl-C left to the coordinator,
  ending with it).
"""
