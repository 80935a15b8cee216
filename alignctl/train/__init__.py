"""Run time: what a stage is trained from (:mod:`alignctl.train.context`), the one lifecycle every stage kind goes
through (:mod:`alignctl.train.lifecycle`) and its health checks (:mod:`alignctl.train.health`)."""
