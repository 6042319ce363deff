"""Sweep machinery: how the runs of a ``-m`` grid are composed, launched, watched, resumed and reported.

- :mod:`~crisp.sweep.sweeper`: every job of a grid composed once and checked before anything runs; each
  distinct run's directory named from the keys that vary.
- :mod:`~crisp.sweep.jobs`: a job's config, run directory and results record, seen from a launcher.
- :mod:`~crisp.sweep.options`: each launcher's settings, typed and checked before anything starts;
  :mod:`~crisp.sweep.folders`: the folders a sweep writes, checked writable; :mod:`~crisp.sweep.config_errors`:
  Hydra's config errors as crisp's one line.
- :mod:`~crisp.sweep.pool`, :mod:`~crisp.sweep.worker`, :mod:`~crisp.sweep.watch`: worker processes that are
  watched for progress (:mod:`crisp.core.heartbeat`) and never outlive the sweep.
- :mod:`~crisp.sweep.launch`, :mod:`~crisp.sweep.parallel`, :mod:`~crisp.sweep.lockstep_launcher`,
  :mod:`~crisp.sweep.group_task`, :mod:`~crisp.sweep.local`: crisp's Hydra launchers on this machine
  (``auto``, ``parallel``, ``lockstep``, ``local``), one process per run or per lockstep group (the plugin
  classes are in ``hydra_plugins/crisp_launchers``); :mod:`~crisp.sweep.held`: the runs another sweep's
  process holds, waited for before the report.
- :mod:`~crisp.sweep.slurm`, :mod:`~crisp.sweep.slurm_task`, :mod:`~crisp.sweep.slurm_queue`,
  :mod:`~crisp.sweep.slurm_lockstep`: the SLURM launchers, one job array per sweep with one task per
  run or per lockstep group: what a task runs on its node, and how the sweep follows the array.
- :mod:`~crisp.sweep.nvidia_mps`, :mod:`~crisp.sweep.callback`: the sweep's start and end.
"""
