"""`python -m fusedlm ...`: the command line (fusedlm/cli.py)."""
import sys

from fusedlm.cli import main

if __name__ == "__main__":  # a spawned child process imports this module as __mp_main__
    sys.exit(main())
