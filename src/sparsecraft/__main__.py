"""``python -m sparsecraft ...`` (and ``torchrun --nproc-per-node N -m sparsecraft prune ...``): the CLI."""

import sys

from sparsecraft.cli import main

sys.exit(main())
