"""Job functions: ``fusionlab.jobs.<name>.run(cfg, output_dir) -> dict`` (selected by ``cfg.job``).

Jobs are the only layer that reads Hydra configs; they translate them into plain calls
to the library (models, tasks, align, ensemble, distill, merge, metrics).
"""
