"""`python -m moe_hooked ...` runs the `moe-hooked` console script (and so does
`torchrun --nproc-per-node N -m moe_hooked report ...`)."""

import sys

from moe_hooked.cli import script

sys.exit(script())
