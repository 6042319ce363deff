import sys

from crisp.bench.cli import main

sys.exit(main())
