import sys

from ares_jax.frontend.cli import main

sys.exit(main())
