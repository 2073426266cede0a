import sys

from resdeploy.cli import main

sys.exit(main())
