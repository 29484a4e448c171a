"""`mtprl probe`: the finite-difference probe of the MTP coefficient λ at a run's checkpoints.

`mtprl.probe.core` holds the procedure (torch); `mtprl.probe.command` the command line (torch-free
until it runs). It sits beside `mtprl.compare`: it uses the trainer's code and the report's statistics.
"""
