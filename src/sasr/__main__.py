import sys

from sasr.cli import main

sys.exit(main())
