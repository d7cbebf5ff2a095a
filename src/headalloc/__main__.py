import sys

from headalloc.cli import main

sys.exit(main())
