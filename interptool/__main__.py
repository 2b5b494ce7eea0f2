import sys

from interptool.cli import main

sys.exit(main())
