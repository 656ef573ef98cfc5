import sys

from md4.cli import main

sys.exit(main())
