import sys

from paddler.cli import main

sys.exit(main())
