"""`kubectl finetune`: the command line for kubetune FineTuneJobs (a kubectl plugin; executable kubectl-finetune).

Commands (commands.py) stay thin: they call the cluster through cluster.py and print what the pure modules
produce: views (tables, describe, the watch line), manifest (create), plot (loss curves), workers (which pod's
log), errors (one-line explanations). main.py parses arguments and turns every failure into one line.
"""

from kubetune_operator.cli.main import main

__all__ = ["main"]
