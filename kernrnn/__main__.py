import sys

from kernrnn.cli import main

sys.exit(main())
