import sys

from graphq.cli import main

sys.exit(main())
