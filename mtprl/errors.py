"""`UserError`: an error whose message is the whole story (what is wrong, where, and the fix).

The command line prints such an error as one line, `mtprl COMMAND: error: MESSAGE`, and exits
with status 2; any other exception is a bug and keeps its traceback. `--debug` (anywhere on the
command line) or `MTPRL_DEBUG=1` shows the traceback of a UserError too. Config, data, report,
checkpoint and run-directory errors derive from it. This module imports nothing, so every layer
may use it.
"""


class UserError(Exception):
    """Bad input (config, data, checkpoint, arguments, run directory) named in the message with its fix."""
