import sys

from dittofx.cli import main

sys.exit(main())
