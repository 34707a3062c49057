"""`python -m driver` runs the qpi-driver command."""

import sys

from driver.cli import main

sys.exit(main())
