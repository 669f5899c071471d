import sys

from embseg.cli import main

sys.exit(main())
