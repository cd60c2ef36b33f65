import sys

from edgecut.cli import main

sys.exit(main())
