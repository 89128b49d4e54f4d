"""`python -m ettin_jax` is the `ettin-jax` command."""

import sys

from ettin_jax.cli import main

sys.exit(main())
