import sys

from mixcon.cli import main

sys.exit(main())
