import sys

from mtprl.cli import main

sys.exit(main())
